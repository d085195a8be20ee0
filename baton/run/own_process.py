"""A run on one device, trained in a process of its own: forked from the flow's process.

The process that runs a flow also runs Prefect's threads (its event loop, the log and
event workers, the artifact publisher). A run on several processes trains in ranks that
run none of them; a run on one device trains the same way: the pipeline lives in a child
process, driven with the same commands as ranks are (:mod:`baton.run.rank_main`) through
:class:`~baton.run.ranks.RankedPipeline`, and only small results come back. Prefect's
threads never compete for the training loop's GIL, and a training process that dies (the OOM
killer, a crash in native code) is a failed task, retried from the newest checkpoint by
a new training process, while the flow run goes on.

The child is forked, not started afresh: it has torch, the engine and the run's modules
loaded already, where a new interpreter would import torch again (about 2 s of start-up).
A fork is made only where the child can use what it inherits:

* Linux (``PR_SET_PDEATHSIG``; elsewhere, and with macOS's runtime, a fork is not safe);
* with several torch threads, no thread in this process but Python's and those that stop
  for a fork (OpenBLAS's): once torch has run a parallel region here, its OpenMP workers
  exist, and a forked child's own first parallel region would wait for them forever;
* CUDA not used here (a child forked after CUDA's driver was initialized cannot use it).

Where one of these does not hold (a notebook that trained on several threads before), the
run trains in this process as before, and says why in the log; so it does where the
operator set ``BATON_TRAINING_PROCESS=flow`` (a platform where forking misbehaves).

In the child: SIGKILL when the flow's process dies (and, should that signal not come, an
exit within ``baton.lifetime.PARENT_CHECK_S``); the flow's process group kept (a
SIGKILL to the group ends the child and its loader workers with the flow), but SIGTERM and
SIGINT ignored (a cancel, a Ctrl-C or a preemption notice is for the flow, which passes a
stop on: the child writes the emergency checkpoint); its log records sent to the flow's
process, which emits them under the same logger names (the run's log file, the task's
output). It never returns into the flow's code: it ends with ``os._exit``.
"""

import contextlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing import Pipe

import torch

from baton.errors import ConfigError
from baton.lifetime import end_with_parent
from baton.run import ranks

# The operator's choice: "fork" (the default: where it is safe) or "flow" (never fork).
TRAINING_PROCESS_ENV = "BATON_TRAINING_PROCESS"
# How many more times the threads are looked at, 20 ms apart, before a fork is refused.
THREAD_CHECKS = 5
# How long a closed training process may take to finish a background save and end.
EXIT_TIMEOUT_S = 120


_IN_TRAINING_PROCESS = False


def in_training_process() -> bool:
    """Whether this process is a training process forked from a flow's."""
    return _IN_TRAINING_PROCESS


def training_process_setting() -> str:
    """The operator's ``BATON_TRAINING_PROCESS``: ``fork`` (the default, also when set
    empty) or ``flow``.

    Raises:
        ConfigError: Any other value.
    """
    where = os.environ.get(TRAINING_PROCESS_ENV) or "fork"
    if where not in ("fork", "flow"):
        raise ConfigError(
            f"{TRAINING_PROCESS_ENV} is {where!r}: set it to 'fork' (the default: a run on "
            "one device trains in a process forked from the flow's, where that is safe) or "
            "'flow' (it trains in the flow's process)"
        )
    return where


def fork_refused() -> str | None:
    """Why training cannot be forked into a process of its own here (``None``: it may be;
    :meth:`TrainingProcess.start` makes the last check, which needs the fork itself).

    Raises:
        ConfigError: The operator's ``BATON_TRAINING_PROCESS`` is neither ``fork`` nor ``flow``.
    """
    if training_process_setting() == "flow":
        return f"the operator's {TRAINING_PROCESS_ENV}=flow"
    if sys.platform != "linux":
        return f"a forked training process needs Linux, not {sys.platform}"
    if torch.cuda.is_initialized() or _cuda_driver_loaded():
        return "CUDA was used in this process, and a forked child cannot use it"
    return None


def _cuda_driver_loaded() -> bool:
    """Whether CUDA's driver library is loaded here: it is once anything asked the CUDA
    runtime a question (``torch.cuda.is_available()`` does), and a child forked after its
    initialization cannot use CUDA, whatever torch's own flag says."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return any("libcuda.so" in line for line in maps)
    except OSError:
        return True  # unknown: not safe


class ForkRefused(Exception):
    """A fork was made, and found unsafe: the child was stopped before it did anything."""


def _threads_outside_python() -> list[int]:
    """This process's threads that Python did not start."""
    python = {thread.native_id for thread in threading.enumerate()}
    return [int(tid) for tid in os.listdir("/proc/self/task") if int(tid) not in python]


class TrainingProcess(ranks.RankGroup):
    """One training process forked from this one, driven as a rank is (with no process
    group: it is the whole run)."""

    what = "the training process"
    launcher = ""
    # It answered the error, and finishes a background save before it exits.
    stuck_after_error = False

    def __init__(self) -> None:
        super().__init__(1)
        self._pid: int | None = None
        self._status: int | None = None

    def start(self) -> None:
        here, there = Pipe()
        parent = os.getpid()
        from_main_thread = threading.current_thread() is threading.main_thread()
        pid = os.fork()
        if pid == 0:  # the child: serve, and never return into the parent's code
            code = 1
            try:
                here.close()
                _become_trainer(parent, from_main_thread)
                from baton.run import rank_main  # here: it imports the pipeline, which imports this

                rank = rank_main.Rank(there)
                _send_logs(rank.send)
                rank_main.serve(rank)
                code = 0
            except BaseException:
                with contextlib.suppress(BaseException):
                    os.write(2, traceback.format_exc().encode(errors="replace"))
            finally:
                os._exit(code)
        there.close()
        self._pid = pid
        self._pids = [pid]
        self._connections = [here]
        ranks._OPEN.add(self)
        # On several torch threads the child runs OpenMP parallel regions, and its first
        # one would wait forever for workers that this process started before the fork
        # (once torch ran a parallel region here) and the child does not have. Libraries
        # whose threads are safe across a fork stop them before one (OpenBLAS does, and
        # starts them again when next used): a thread outside Python still running now may
        # be such a worker. The child waits for its first command: stopped now, it has
        # done nothing. (On one torch thread the child never enters a parallel region.)
        others = _threads_outside_python() if torch.get_num_threads() > 1 else []
        for _ in range(THREAD_CHECKS):  # a Python thread that is starting or ending is not
            if not others:  # yet (or no longer) Python's for a moment: look again
                break
            time.sleep(0.02)
            others = _threads_outside_python()
        if others:
            self.close(graceful=False)
            raise ForkRefused(
                f"{len(others)} thread(s) of this process are not Python's and do not "
                "stop for a fork (torch's OpenMP workers, once torch ran on several "
                "threads here)"
            )

    @property
    def pid(self) -> int | None:
        """The training process's pid (``None`` once it is stopped)."""
        return self._pid

    def describe(self) -> str:
        """The process, for the run's log."""
        return f"process {self._pid}, forked from this one"

    def exit_code(self) -> int | None:
        """The child's exit code (negative: the signal that ended it); ``None`` while it
        runs. Reaps it."""
        if self._status is None and self._pid is not None:
            try:
                pid, status = os.waitpid(self._pid, os.WNOHANG)
            except ChildProcessError:  # reaped by someone else: gone all the same
                self._status = -1
            else:
                if pid:
                    self._status = os.waitstatus_to_exitcode(status)
        return self._status

    def close(self, *, graceful: bool = True) -> None:
        """Stop the training process: a stop (a command still running ends at its next
        iteration, with an emergency checkpoint), then ``exit`` (it finishes a background
        save); its last log records are read until it ends, then it is reaped. Not
        ``graceful``, or past ``EXIT_TIMEOUT_S``: SIGKILL (it ignores SIGTERM)."""
        ranks._OPEN.discard(self)
        if graceful:
            self._send_all(("stop", ()))
            self._send_all(("exit", ()))
            self._drain(time.monotonic() + EXIT_TIMEOUT_S)
        self._drop()
        pid, self._pids = self._pid, []
        if pid is None:
            return
        if self.exit_code() is None:
            os.kill(pid, signal.SIGKILL)
            while self.exit_code() is None:
                time.sleep(0.01)
        self._pid = None

    def _drain(self, deadline: float) -> None:
        """Emit the log records the child sends until it ends (or ``deadline``)."""
        for connection in self._connections:
            while self.exit_code() is None and time.monotonic() < deadline:
                if not connection.poll(ranks.POLL_S):
                    continue
                try:
                    kind, payload = connection.recv()
                except Exception:  # ended (EOF), or cut mid-message
                    break
                if kind == "log":
                    ranks.emit_record(payload)
            while self.exit_code() is None and time.monotonic() < deadline:
                time.sleep(0.01)  # its end, after the connection's


class _ToParent(logging.Handler):
    """Log records of the training process, sent to the flow's process."""

    def __init__(self, send) -> None:
        super().__init__()
        self._send = send
        self._pid = os.getpid()

    def emit(self, record: logging.LogRecord) -> None:
        if os.getpid() != self._pid:
            # A process the training process forked (a loader worker, a background
            # write): its records go to its stderr, never into the connection.
            with contextlib.suppress(Exception):
                os.write(2, (self.format(record) + "\n").encode(errors="replace"))
            return
        try:
            message = self.format(record)  # with the traceback, if any
            fields = {key: getattr(record, key) for key in _RECORD_FIELDS}
            self._send(("log", {**fields, "msg": message, "args": None}))
        except Exception:
            self.handleError(record)


# What a record keeps on its way to the parent (its message is sent formatted).
_RECORD_FIELDS = (
    "name",
    "levelno",
    "levelname",
    "pathname",
    "filename",
    "module",
    "lineno",
    "funcName",
    "created",
    "msecs",
    "relativeCreated",
    "process",
    "processName",
    "thread",
    "threadName",
)


def _become_trainer(parent: int, from_main_thread: bool) -> None:
    """Set up the forked child (see the module docstring)."""
    global _IN_TRAINING_PROCESS
    _IN_TRAINING_PROCESS = True
    end_with_parent(parent, from_main_thread=from_main_thread, exit_code=ranks.DRIVER_GONE)
    # The child stays in the flow's process group, so that a SIGKILL to the group ends it
    # (and its loader workers) as it ends the flow; the group's termination requests are
    # for the flow, which passes a stop on, so the child ignores them.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    for signum in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_DFL)
    # New stdio objects: another thread of the parent may have held the old ones' locks.
    sys.stdout = open(1, "w", closefd=False, errors="backslashreplace", buffering=1)  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False, errors="backslashreplace", buffering=1)  # noqa: SIM115


def _send_logs(send) -> None:
    """Every log record of the child (and its warnings) goes to the parent, none to the
    parent's handlers it inherited (Prefect's API handler, the run's log file, streams)."""
    handler = _ToParent(send)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for each in [logging.root, *logging.Logger.manager.loggerDict.values()]:
        if isinstance(each, logging.Logger):
            each.handlers.clear()
            each.propagate = True
    logging.root.addHandler(handler)
    logging.captureWarnings(True)
