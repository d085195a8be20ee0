"""A run on several processes, driven from one: the ranks and the pipeline that stands for them.

With ``launcher.nproc: N`` (N > 1), the process that runs the pipeline (the flow's, or
``baton.run.pipeline.run``'s) does not train itself. It starts N training processes with
``torchrun`` (torch's own launcher: rendezvous, one process per device, and when one
process dies it stops the others), and drives them: each step (build, train an epoch,
evaluate, save) is a command sent to every rank, which runs the very step function a
single process runs (:mod:`baton.run.rank_main`), and the small result of rank 0 (a
position, metrics, a :class:`~baton.checkpoint.CheckpointRef`) comes back. The model
never leaves the ranks; the ranks live as long as the pipeline that stands for them
(:class:`RankedPipeline`), which is as long as a flow run keeps its live pipeline.

Commands and results travel over ``multiprocessing.connection`` on 127.0.0.1, each rank
authenticated by a key only the driver and its children know.

What ends the ranks, in every case:

* the pipeline's :meth:`RankedPipeline.close` (a flow run's end, a rebuild after a failed
  task): an ``exit`` command, then SIGTERM and SIGKILL to torchrun's whole session;
* a rank that dies or raises: torchrun stops the others, the driver's command raises
  (:class:`~baton.errors.RankFailedError`, or the rank's own error), and the task fails;
* the driver killed (SIGKILL included): each rank's connection closes, and the rank
  exits at once; torchrun gets SIGTERM from the kernel as its parent dies
  (``PR_SET_PDEATHSIG``), and the ranks get SIGKILL as theirs does;
* a termination request during training (a cancel): sent to every rank, which agree on
  the iteration to stop at and write one complete sharded emergency checkpoint.
"""

import atexit
import contextlib
import logging
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener, wait
from typing import Any

from baton import errors
from baton.checkpoint.ref import CheckpointRef
from baton.config.schema import PipelineConfig
from baton.errors import RankFailedError
from baton.experiment.folder import Experiment
from baton.lifetime import PR_SET_PDEATHSIG
from baton.run.interrupt import StopRequest, TrainingInterrupted
from baton.trust.allowances import Trust

logger = logging.getLogger(__name__)

# Environment of the ranks: where to reach the driver, and the key that proves it.
ADDRESS_ENV = "BATON_RANKS_ADDRESS"
AUTHKEY_ENV = "BATON_RANKS_AUTHKEY"
# How long the ranks may take to start and connect (torchrun, imports, rendezvous).
START_TIMEOUT_S = 120
# How long ``exit`` may take before torchrun's session is terminated, then killed.
EXIT_TIMEOUT_S = 10
KILL_TIMEOUT_S = 5
# How often a waiting driver looks at its ranks' process and a pending stop.
POLL_S = 0.1
# Exit code of a rank whose driver went away.
DRIVER_GONE = 70

# ``python -c _LAUNCH TORCHRUN-ARGS``: torchrun, set to get SIGTERM when the driver dies.
# The setting survives ``exec``; it is made in the child itself because a ``preexec_fn``
# is not safe in a driver that runs threads (Prefect's), and with nothing imported first,
# so that it costs no start-up time.
_LAUNCH = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    f"    ctypes.CDLL(None).prctl({PR_SET_PDEATHSIG}, int(signal.SIGTERM), 0, 0, 0)\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'torch.distributed.run', *sys.argv[1:]])\n"
)


@dataclass
class Position:
    """Where the ranks stand (as :class:`~baton.engine.strategy.SingleDeviceStrategy`
    says it: completed epochs and iterations, iterations of the current epoch)."""

    epoch: int = 0
    iter: int = 0
    step_in_epoch: int = 0


class RankGroup:
    """N training processes started by torchrun, driven by commands from this process."""

    what = "the training processes"  # for messages
    launcher = "torchrun: "
    # After a rank raised, the others wait in a collective for it: the group cannot go on
    # and is stopped at once (a process training alone is not stuck: see own_process).
    stuck_after_error = True

    def __init__(self, nproc: int) -> None:
        self.nproc = nproc
        self._process: subprocess.Popen | None = None
        self._connections: list[Connection] = []
        self._listener: Listener | None = None
        self._pids: list[int] = []  # the ranks': torchrun starts each in a session of its own

    def start(self) -> None:
        """Start the ranks and wait until every one has connected.

        Raises:
            RankFailedError: torchrun exited, or the ranks did not connect in time.
        """
        authkey = secrets.token_bytes(32)
        self._listener = Listener(("127.0.0.1", 0), authkey=authkey)
        host, port = self._listener.address
        env = {**os.environ, ADDRESS_ENV: f"{host}:{port}", AUTHKEY_ENV: authkey.hex()}
        env.setdefault("OMP_NUM_THREADS", str(torch_threads(self.nproc)))
        command = [
            sys.executable,
            "-c",
            _LAUNCH,  # torchrun, made to die with this process
            "--standalone",
            f"--nproc-per-node={self.nproc}",
            "--max-restarts=0",
            "--monitor-interval=0.2",
            "-m",
            "baton.run.rank_main",
        ]
        self._process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a signal to the driver's group is for the driver
        )
        _OPEN.add(self)
        try:
            self._connections = self._accept(time.monotonic() + START_TIMEOUT_S)
        except BaseException:
            self.close()
            raise
        finally:
            self._listener.close()
            self._listener = None

    def _accept(self, deadline: float) -> list[Connection]:
        """Every rank's connection, in rank order; torchrun's health is checked while
        waiting (the accepting thread ends when the listener closes)."""
        arrived: queue.Queue = queue.Queue()
        listener = self._listener

        def accept() -> None:
            while True:
                try:
                    connection = listener.accept()
                    rank, pid = connection.recv()
                    arrived.put((int(rank), int(pid), connection))
                except AuthenticationError:
                    continue  # not one of our ranks (a port scan, another user): ignored
                except (OSError, EOFError):  # closed: the start failed or timed out
                    return

        threading.Thread(target=accept, name="baton-ranks-accept", daemon=True).start()
        by_rank: dict[int, Connection] = {}
        while len(by_rank) < self.nproc:
            if time.monotonic() > deadline:
                raise RankFailedError(
                    f"the {self.nproc} training processes did not start within "
                    f"{START_TIMEOUT_S} s; see the run's log for torchrun's output"
                )
            self._check_alive()
            try:
                rank, pid, connection = arrived.get(timeout=POLL_S)
            except queue.Empty:
                continue
            by_rank[rank] = connection
            self._pids.append(pid)
        return [by_rank[r] for r in range(self.nproc)]

    def describe(self) -> str:
        """The processes, for the run's log."""
        return (
            f"{self.nproc} processes started by torchrun (pids {', '.join(map(str, self._pids))})"
        )

    def exit_code(self) -> int | None:
        """torchrun's exit code; ``None`` while it runs."""
        return self._process.poll() if self._process is not None else None

    def _check_alive(self) -> None:
        code = self.exit_code()
        if code is not None:
            raise RankFailedError(
                f"{self.what} exited ({self.launcher}exit code {code}): see the run's log. "
                "A retry starts training again from the newest committed checkpoint"
            )

    def call(
        self,
        command: str,
        *args: Any,
        stop: StopRequest | None = None,
        on_progress: Callable[[Any], None] | None = None,
    ) -> Any:
        """Run ``command`` on every rank; rank 0's result.

        Args:
            stop: While the ranks work, a termination request recorded here is passed on
                to them (once).
            on_progress: Called with what rank 0 reports while it works.

        Raises:
            RankFailedError: A rank died, or the group is closed.
            Exception: The error a rank raised (rank 0's, or the first one's).
            TrainingInterrupted: The ranks stopped on a termination request.
        """
        if not self._connections:
            raise RankFailedError("the training processes are stopped; build the pipeline again")
        try:
            for connection in self._connections:
                connection.send((command, args))
        except OSError as err:
            raise self._failure(err) from err
        results: dict[int, tuple] = {}
        told_to_stop = False
        while len(results) < self.nproc:
            if stop is not None and stop.requested and not told_to_stop:
                self._send_all(("stop", ()))
                told_to_stop = True
            waiting = [c for r, c in enumerate(self._connections) if r not in results]
            ready = wait(waiting, timeout=POLL_S)
            for connection in ready:
                rank = self._connections.index(connection)
                try:
                    kind, payload = connection.recv()
                except Exception as err:  # closed, or cut mid-message by a death
                    raise self._failure(err) from err
                if kind == "progress":
                    if on_progress is not None:
                        on_progress(payload)
                    continue
                if kind == "log":
                    emit_record(payload)
                    continue
                if kind == "error":
                    self.close(graceful=not self.stuck_after_error)
                    raise rank_error(rank, payload)
                results[rank] = (kind, payload)
            if not ready:  # what a process sent before it ended is read first
                self._check_alive_or_fail()
        return self._outcome(results)

    def _check_alive_or_fail(self) -> None:
        try:
            self._check_alive()
        except RankFailedError:
            self._drop()
            raise

    def _failure(self, err: BaseException) -> RankFailedError:
        self._drop()
        code = self.exit_code()
        how = (
            f"{self.launcher}exit code {code}"
            if code is not None
            else str(err) or "connection lost"
        )
        return RankFailedError(
            f"a training process died ({how}); a retry starts training again from the newest "
            "committed checkpoint"
        )

    def _outcome(self, results: dict[int, tuple]) -> Any:
        kind, payload = results[0]
        if kind == "interrupted":
            interrupted = TrainingInterrupted("termination requested")
            interrupted.checkpoint, position = payload
            interrupted.position = position
            raise interrupted
        return payload

    def _send_all(self, message: tuple) -> None:
        for connection in self._connections:
            with contextlib.suppress(OSError):  # a dead rank is reported by the wait
                connection.send(message)

    def _drop(self) -> None:
        for connection in self._connections:
            connection.close()
        self._connections = []

    def close(self, *, graceful: bool = True) -> None:
        """Stop the ranks: ``exit`` (unless not ``graceful``: they may be stuck in a
        collective), then SIGTERM and SIGKILL to torchrun's session."""
        if graceful:
            self._send_all(("exit", ()))
        process, self._process = self._process, None
        _OPEN.discard(self)
        if process is None:
            self._drop()
            return
        steps = ((None, EXIT_TIMEOUT_S),) if graceful else ()
        for signum, timeout in (*steps, (signal.SIGTERM, KILL_TIMEOUT_S)):
            if signum is not None:
                _signal_session(process.pid, signum)
            try:
                process.wait(timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        _signal_session(process.pid, signal.SIGKILL)  # anything torchrun left behind
        process.wait()
        self._drop()
        self._kill_ranks()

    def _kill_ranks(self) -> None:
        """Make sure no rank outlives torchrun (each leads a session of its own, so the
        signals above reach only torchrun): SIGKILL any still alive, and wait for it."""
        pids, self._pids = self._pids, []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + KILL_TIMEOUT_S
        for pid in pids:
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.01)


def emit_record(fields: dict) -> None:
    """Handle here a log record a training process sent (its level was applied there)."""
    record = logging.makeLogRecord(fields)
    logging.getLogger(record.name).handle(record)


def rank_error(rank: int, described: tuple[str, str, str, str]) -> BaseException:
    """The error a rank raised, as its type where that is one of baton's (so that a
    permanent error is not retried), else a :class:`~baton.errors.RankFailedError`;
    the rank's traceback is in its notes."""
    module, name, message, details = described
    cls = getattr(errors, name, None) if module == errors.__name__ else None
    if isinstance(cls, type) and issubclass(cls, errors.BatonError):
        err = cls.__new__(cls)
        err.args = (message,)
    else:
        err = RankFailedError(f"rank {rank} raised {name}: {message}")
    err.__notes__ = [f"raised by rank {rank}:", details]
    return err


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, waiting for torchrun's exit to be reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _signal_session(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)  # torchrun leads its own session: it and every rank


def torch_threads(nproc: int) -> int:
    """Threads each rank gives torch when the operator's environment sets none: the
    machine's cores shared by the ranks (torchrun's own default is 1)."""
    return max(1, (os.cpu_count() or 1) // nproc)


_OPEN: "weakref.WeakSet[RankGroup]" = weakref.WeakSet()


@atexit.register
def _close_open_groups() -> None:
    for group in list(_OPEN):
        group.close()


class RankedPipeline:
    """The live pipeline of a run on several processes, as the tasks see it: its position,
    horizon and config here, its model in the ranks (see the module docstring).

    It answers what a task asks of a :class:`~baton.run.live.Pipeline` (``strategy``'s
    position, ``max_epochs``, ``max_iters``, ``epoch_length``, ``finished``,
    ``experiment``, ``pending_fork``); the steps are its methods, which
    :mod:`baton.run.pipeline` calls.
    """

    def __init__(self, cfg: PipelineConfig, group: RankGroup, built: Mapping[str, Any]) -> None:
        self.config = cfg
        self.group = group
        self.strategy = Position()
        self.max_epochs = int(built["max_epochs"])
        self.max_iters = int(built["max_iters"])
        self.epoch_length = int(built["epoch_length"])
        self.pending_fork = True if built.get("pending_fork") else None
        self._moved(built)

    @property
    def trains_in(self) -> str:
        """Where it trains, for the run's log."""
        return self.group.describe()

    @classmethod
    def start(
        cls,
        cfg: PipelineConfig,
        checkpoint: CheckpointRef | None,
        *,
        to_iter: int | None,
        evaluated: bool,
        trust: Trust,
        group: RankGroup | None = None,
    ) -> "RankedPipeline":
        """Start ``launcher.nproc`` ranks (or ``group``: a process of its own for a run on
        one device) and build the pipeline in each, as :func:`baton.run.pipeline.restore`
        does in one process."""
        group = RankGroup(cfg.launcher.nproc) if group is None else group
        group.start()
        try:
            built = group.call(
                "build", cfg.model_dump(mode="json"), checkpoint, to_iter, evaluated, trust
            )
        except BaseException:
            group.close()
            raise
        return cls(cfg, group, built)

    def _moved(self, answer: Mapping[str, Any]) -> None:
        self.strategy.epoch, self.strategy.iter, self.strategy.step_in_epoch = answer["position"]

    @property
    def experiment(self) -> Experiment:
        """The experiment the ranks train."""
        return Experiment.of(self.config)

    @property
    def finished(self) -> bool:
        """True once the horizon is reached."""
        return self.strategy.iter >= self.max_iters

    def train_until_stopped(self, stop: StopRequest, *, progress=None) -> dict[str, float]:
        """Train the current epoch on every rank (see ``steps.train_until_stopped``);
        a termination request in ``stop`` is passed on to the ranks."""

        def on_progress(report: tuple) -> None:
            if progress is not None:
                running, step = report
                progress(running, step)

        try:
            # without a display, rank 0 reads no running metrics for it (a device sync)
            answer = self.group.call(
                "train", progress is not None, stop=stop, on_progress=on_progress
            )
        except TrainingInterrupted as interrupted:
            self._moved({"position": interrupted.position})
            raise
        self._moved(answer)
        return answer["metrics"]

    def evaluate(self) -> dict[str, float]:
        """Validation metrics over every rank's share of the validation data."""
        return self.group.call("evaluate")["metrics"]

    def save_epoch(self, metrics: dict[str, float], *, background: bool) -> CheckpointRef | None:
        """The checkpoint after an epoch, sharded, written by every rank (see
        ``steps.save_epoch``)."""
        answer = self.group.call("save_epoch", metrics, background)
        self.pending_fork = None
        return answer["checkpoint"]

    def close(self) -> None:
        """Stop the ranks."""
        self.group.close()
