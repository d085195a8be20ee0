"""A bounded queue and one background thread that delivers it to a tracker (a sink), so
that a tracker that is down or slow never fails or stalls training (contract 14).

Training only puts values in the queue (never blocks, never raises), or leaves them in a
record the thread reads (``collect``: the metrics log), asked only for what fits. The
thread sends them in batches; a failed send keeps its batch at the head of the queue and
is tried again every ``retry_s``; while the queue is full, a record waits to be read and
what is put is dropped and counted. At
the end, :meth:`Sender.close` waits a bounded time for the queue to drain; what is left
is counted as unsent. :class:`SendReport` says all of it, for the log and the run's
summary: a loss is reported, never hidden.
"""

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

logger = logging.getLogger(__name__)

# How often the thread asks ``collect`` for new values while nothing else wakes it.
DEFAULT_POLL_S = 1.0


class Sink(Protocol):
    """Where a :class:`Sender` delivers: a tracker's client."""

    #: The most items one :meth:`send` takes.
    max_batch: int

    def open(self) -> None:
        """Connect (find or create the tracker's run); raise to be tried again later."""
        ...

    def send(self, batch: list[Any]) -> None:
        """Deliver ``batch``; raise to have the same batch tried again later."""
        ...

    def close(self, finished: bool) -> None:
        """End the tracker's run (``finished``: training reached its horizon)."""
        ...


@dataclass(frozen=True)
class SendReport:
    """What a :class:`Sender` delivered and what it lost.

    Attributes:
        sent: Items the tracker took.
        dropped: Items dropped because the queue was full.
        unsent: Items still waiting when the sender was closed (lost to the tracker).
        failures: Failed connections and sends.
        last_error: The newest failure, as ``Type: message``.
        connected: Whether the tracker was reached at least once.
    """

    sent: int = 0
    dropped: int = 0
    unsent: int = 0
    failures: int = 0
    last_error: str | None = None
    connected: bool = False

    @property
    def lost(self) -> int:
        """Items the tracker will never get from this run."""
        return self.dropped + self.unsent

    def describe(self) -> str:
        """One sentence for a log line or the run's summary."""
        said = f"{self.sent} value(s) sent"
        if self.lost:
            said += f", {self.lost} LOST ({self.dropped} dropped: queue full, {self.unsent} unsent at the end)"
        if self.failures:
            said += f"; {self.failures} failed attempt(s), the last: {self.last_error}"
        if not self.connected:
            said += "; the tracker was never reached"
        return said


class Sender:
    """Delivers items to ``sink`` from a background thread (see the module docstring).

    Args:
        sink: The tracker's client.
        max_items: The queue's bound.
        retry_s: The wait after a failed connection or send.
        collect: Called from the thread every ``poll_s`` and once more at close, with the
            room left in the queue; what it returns joins the queue (the tracker reading
            the metrics log as it grows: what does not fit stays in the log for later).
        poll_s: How often ``collect`` is called.
        name: The thread's name and the tracker's name in log lines.
    """

    def __init__(
        self,
        sink: Sink,
        *,
        max_items: int,
        retry_s: float,
        collect: Callable[[int], list[Any]] | None = None,
        poll_s: float = DEFAULT_POLL_S,
        name: str = "tracker",
    ) -> None:
        self._sink = sink
        self._max_items = max_items
        self._retry_s = retry_s
        self._collect = collect
        self._poll_s = poll_s
        self._name = name
        self._queue: deque[Any] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._opened = False
        self._closing = False
        self._collected_last = False
        self._abandoned = False
        self._finished = False
        self._sent = 0
        self._dropped = 0
        self._failures = 0
        self._last_error: str | None = None
        self._failing = False

    @property
    def name(self) -> str:
        """The sender's name in log lines."""
        return self._name

    def start(self) -> None:
        """Start the thread (once)."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()

    def put(self, items: list[Any]) -> None:
        """Queue ``items``; never blocks. What does not fit is dropped and counted."""
        if not items:
            return
        with self._cond:
            room = self._max_items - len(self._queue)
            if room < len(items):
                if self._dropped == 0:
                    logger.warning(
                        "%s: the queue is full (%d values): dropping new values until the "
                        "tracker takes some; the run's summary counts them",
                        self._name,
                        self._max_items,
                    )
                self._dropped += len(items) - max(room, 0)
                items = items[: max(room, 0)]
            self._queue.extend(items)
            self._cond.notify_all()

    def report(self) -> SendReport:
        """What was delivered and lost so far."""
        with self._cond:
            return self._report_locked()

    def close(self, timeout_s: float, *, finished: bool) -> SendReport:
        """Collect a last time, send what waits for at most ``timeout_s``, end the
        tracker's run (``finished``: training reached its horizon) and stop.

        Returns:
            The final report (the caller says it): what could not be sent in time is
            counted ``unsent``.
        """
        with self._cond:
            if self._closing:
                return self._report_locked()
            self._closing = True
            self._finished = finished
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
        with self._cond:
            if thread is not None and thread.is_alive():
                self._abandoned = True
                self._cond.notify_all()
            return self._report_locked()

    def _report_locked(self) -> SendReport:
        unsent = len(self._queue) if (self._abandoned or not self._thread_alive()) else 0
        return SendReport(
            sent=self._sent,
            dropped=self._dropped,
            unsent=unsent if self._closing else 0,
            failures=self._failures,
            last_error=self._last_error,
            connected=self._opened,
        )

    def _thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- the thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        next_collect = 0.0
        while True:
            with self._cond:
                if self._abandoned:
                    return
                closing = self._closing and not self._collected_last
            now = time.monotonic()
            exhausted = False
            if self._collect is None:
                exhausted = True
            elif closing or now >= next_collect:
                exhausted = self._run_collect()
                next_collect = now + self._poll_s
            if closing and exhausted:  # at the end, the record is read to its end
                with self._cond:
                    self._collected_last = True
            if not self._opened and not self._attempt(self._sink.open):
                if self._wait_after_failure():
                    return
                continue
            self._opened = True
            with self._cond:
                batch = [self._queue[i] for i in range(min(len(self._queue), self._sink.max_batch))]
            if batch:
                if self._attempt(lambda batch=batch: self._sink.send(batch)):
                    with self._cond:
                        for _ in batch:
                            self._queue.popleft()
                        self._sent += len(batch)
                    continue
                if self._wait_after_failure():
                    return
                continue
            with self._cond:
                if self._closing and self._collected_last:
                    break
                timeout = max(0.0, next_collect - time.monotonic()) if self._collect else None
                self._cond.wait(timeout)
        self._attempt(lambda: self._sink.close(self._finished))

    def _run_collect(self) -> bool:
        """Queue what the record gained, as much as fits; True when it had nothing more."""
        with self._cond:
            room = self._max_items - len(self._queue)
        if room <= 0:
            return False  # the record keeps what does not fit; read once the tracker took some
        try:
            items = self._collect(room)
        except Exception as err:  # reading the run's own record failed: say so, go on
            logger.warning(
                "%s: could not read what to send (%s: %s)", self._name, type(err).__name__, err
            )
            return True
        self.put(items)
        return not items

    def _attempt(self, action: Callable[[], None]) -> bool:
        """Run one call to the tracker; note a failure (logged at the first of a series)."""
        try:
            action()
        except Exception as err:  # a tracker's failure is never the run's
            with self._cond:
                self._failures += 1
                self._last_error = f"{type(err).__name__}: {str(err)[:300]}"
                first = not self._failing
                self._failing = True
            if first:
                logger.warning(
                    "%s: %s; training goes on, values wait (at most %d) and are sent again "
                    "every %g s",
                    self._name,
                    self._last_error,
                    self._max_items,
                    self._retry_s,
                )
            return False
        if self._failing:
            with self._cond:
                self._failing = False
            logger.info("%s: the tracker takes values again", self._name)
        return True

    def _wait_after_failure(self) -> bool:
        """Wait ``retry_s`` (less when closing); True when the thread should stop."""
        with self._cond:
            self._cond.wait_for(lambda: self._abandoned, self._retry_s)
            return self._abandoned
