"""Deferred termination: a SIGTERM waits for the end of the current training iteration.

A cancel from the Prefect UI, a preemption notice or ``kill`` delivers SIGTERM, which
Prefect turns into an exception raised at whatever bytecode is running, possibly between
``optimizer.step()`` and the position update. Inside :func:`deferred_termination` the
signal is only recorded; the loop polls :meth:`StopRequest.check` after each iteration,
raising :class:`TrainingInterrupted` at a consistent point so the caller can write an
emergency checkpoint. On leaving the block, the recorded signal is handed to the handler
that was installed before (Prefect's, or the default that ends the process).
"""

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass


class TrainingInterrupted(BaseException):
    """Raised at an iteration boundary after a termination signal arrived.

    ``checkpoint`` is the reference of the checkpoint that holds the position it stopped
    at: the emergency checkpoint written before it went on
    (``baton.run.steps.train_until_stopped``), or one committed before. Whoever catches it
    may add what it knows for the record: ``position`` (completed epochs, completed
    iterations, the horizon's iterations), ``saved_now`` (the checkpoint was written for
    this stop) and ``reason`` (why training was asked to stop, when more is known than
    the signal).
    """

    checkpoint = None
    position: tuple[int, int, int] | None = None
    saved_now = True
    reason: str | None = None


@dataclass
class StopRequest:
    """Whether a termination signal is pending."""

    signum: int | None = None

    @property
    def requested(self) -> bool:
        """True once a signal has been received."""
        return self.signum is not None

    def check(self, *_args) -> None:
        """Raise :class:`TrainingInterrupted` if a signal is pending (use as a loop hook)."""
        if self.signum is not None:
            raise TrainingInterrupted(f"signal {self.signum} received")


@contextlib.contextmanager
def deferred_termination(signals: tuple[int, ...] = (signal.SIGTERM,)) -> Iterator[StopRequest]:
    """Record termination signals instead of acting on them until the block ends.

    Outside the main thread (where handlers cannot be installed) this does nothing.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {sig: signal.getsignal(sig) for sig in signals}
    frames: dict = {}

    def record(signum, frame):
        request.signum = signum
        frames["frame"] = frame

    for sig in signals:
        signal.signal(sig, record)
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if request.signum is not None:
            handler = previous[request.signum]
            if callable(handler):
                handler(request.signum, frames.get("frame"))
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), request.signum)
