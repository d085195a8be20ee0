"""Models that fail or dawdle on purpose, for fault-injection tests.

Configs reach them because the suite trusts ``tests`` (BATON_ALLOWED_MODULES, set in
tests/conftest.py). A failure budget lives in a file,
so it is shared by retries, flow retries and new processes.
"""

import os
import shutil
import signal
import time
from pathlib import Path

import torch

from baton.models import MLP
from baton.run import own_process


class FlakyMLP(MLP):
    """An MLP whose training forward raises at iteration ``fail_at`` until ``failures``
    failures have been spent (counted in the file ``budget``).

    The iteration count is a buffer, so it is checkpointed and restored like the weights:
    a resumed run reaches the same iteration again."""

    def __init__(self, *args, fail_at: int, budget: str, failures: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.fail_at = fail_at
        self.budget = Path(budget)
        self.failures = failures
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if int(self.calls) == self.fail_at:
                spent = int(self.budget.read_text()) if self.budget.exists() else 0
                if spent < self.failures:
                    self.budget.write_text(str(spent + 1))
                    raise RuntimeError(f"injected failure {spent + 1}/{self.failures}")
        return super().forward(x)


class SlowMLP(MLP):
    """An MLP that sleeps ``delay`` seconds per training forward (room to kill it mid-epoch).

    With ``progress``, each training forward writes the number of forwards so far to that
    file, so a test can wait for a precise point inside an epoch."""

    def __init__(self, *args, delay: float = 0.01, progress: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.delay = delay
        self.progress = Path(progress) if progress else None
        self.forwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            time.sleep(self.delay)
            self.forwards += 1
            if self.progress is not None:
                self.progress.write_text(str(self.forwards))
        return super().forward(x)


def forwards_so_far(progress: Path) -> int:
    """How many training forwards a SlowMLP with ``progress`` has done (0 before it starts)."""
    try:
        return int(progress.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


class KillingMLP(MLP):
    """An MLP whose first training forward SIGKILLs the flow run's process, as a crash of
    its host would: every run of it crashes, a crash loop. (In a training process forked
    from the flow's, that is its parent; the kernel then ends the training process too.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            flows = os.getppid() if own_process.in_training_process() else os.getpid()
            os.kill(flows, signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(x)


class DyingMLP(MLP):
    """An MLP that SIGKILLs its own process, a training process forked from a flow's, at
    training forward ``die_at``, as the OOM killer would, as long as the file ``budget``
    holds a number below 1 (then adds 1 to it): it dies once, and the retry trains on."""

    def __init__(self, *args, die_at: int, budget: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.die_at, self.budget = die_at, Path(budget)
        self.forwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.forwards += 1
            spent = int(self.budget.read_text()) if self.budget.exists() else 0
            if self.forwards == self.die_at and spent < 1:
                if not own_process.in_training_process():  # never the test's own process
                    raise RuntimeError("DyingMLP trains only in a forked training process")
                self.budget.write_text(str(spent + 1))
                os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(x)


class MovingMLP(MLP):
    """An MLP whose training forward number ``move_at`` moves the experiment folder
    ``folder`` to ``to`` (``os.rename``), or deletes it when ``to`` is empty, as a user
    tidying up disks would while the run trains. It happens once: ``done`` (a file)
    records it, so a run of the same config at the new place trains undisturbed."""

    def __init__(self, *args, move_at: int, folder: str, to: str = "", done: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.move_at = move_at
        self.folder, self.destination, self.done = Path(folder), to, Path(done)
        self.forwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.forwards += 1
            if self.forwards == self.move_at and not self.done.exists():
                self.done.write_text("moved")
                if self.destination:
                    Path(self.destination).parent.mkdir(parents=True, exist_ok=True)
                    os.rename(self.folder, self.destination)
                else:
                    shutil.rmtree(self.folder)
        return super().forward(x)
