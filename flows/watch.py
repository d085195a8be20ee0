"""A training flow run watches itself: its worker, its server, its own state.

Prefect delivers a cancel through the worker that started the run, and learns of a dead
run from its worker or from missing heartbeats. What it leaves open is handled here, by
one daemon thread of the flow process (:class:`RunWatch`):

- **The worker dies, the machine lives.** The run's output goes through a pipe to the
  worker; once nobody reads it, Prefect's console handler ends the process at its next
  log line (rich turns the broken pipe into ``SystemExit``), and the epoch in progress
  is lost. The watch holds a reader of its own on those pipes, so that a write never
  breaks; when this process's parent changes (the worker is gone), it sends the output
  to a file in the experiment's ``runs/`` folder and stops training as a SIGTERM would:
  an emergency checkpoint, then the run creates its restart and ends Crashed
  ("Interrupted"); the restart continues once a worker serves the pool again.
- **The server is unreachable for a while** (an upgrade, a restart). Training goes on.
  Prefect's own cancellation watch in the worker gives up for good after an outage;
  the watch reads the run's state itself, so a cancel sent afterwards is honoured. When
  the server answers again, the watch hands the news to ``on_reconnect`` (the flow
  sends again what the server lost: dropped events, the artifacts).
- **The server takes the live run for dead**: heartbeats sent during an outage never
  arrived, and ``baton-mark-silent-runs`` marks it ``Silent``; the watch sets it Running
  again, saying why. A run marked Crashed has lost its slot: the watch stops it with an
  emergency checkpoint, and the automation's restart continues it.
- **The deployment's concurrency lease.** Prefect's engine renews the run's slot every
  225 s for 300 s and ends the run, wherever it is, when a renewal fails: an outage of
  more than 75 s at the wrong moment would kill it. The watch renews the lease at every
  read for ``LEASE_S`` (10 minutes), so that the lease outlives an outage of several
  minutes; when the server has lost the lease (a server that keeps leases in memory,
  restarted), the watch stops training with an emergency checkpoint and the run's
  restart continues, before Prefect's renewal fails mid-iteration.

The watch reads one flow run every ``BATON_WATCH_INTERVAL_S`` seconds (5 by default,
the operator's setting), without retries and with a short timeout.
"""

import contextlib
import contextvars
import logging
import os
import signal
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx

DEFAULT_INTERVAL_S = 5.0
# How often the watch looks at its parent process (a cheap system call).
_TICK_S = 0.25
# One read of the run's state; an unreachable server answers at once, a hung one not.
_READ_TIMEOUT_S = 5.0
# The name of the state baton-mark-silent-runs gives a run it heard nothing from.
SILENT = "Silent"
# How long each renewal of the run's concurrency lease holds it (Prefect's engine: 300 s).
LEASE_S = 600.0


def _log() -> logging.Logger | logging.LoggerAdapter:
    """The flow run's logger (the UI shows its lines); the watch runs in the run's context."""
    from baton.tasks._common import run_logger

    return run_logger()


def watch_interval() -> float:
    """Seconds between two reads of the run's state (``BATON_WATCH_INTERVAL_S``)."""
    raw = os.environ.get("BATON_WATCH_INTERVAL_S", "")
    try:
        value = float(raw) if raw else DEFAULT_INTERVAL_S
    except ValueError:
        value = DEFAULT_INTERVAL_S
    return min(max(value, 0.2), 300.0)


class RunWatch:
    """Watches flow run ``run_id`` from a daemon thread of its own process (see module doc).

    Args:
        run_id: This process's flow run.
        deployment_id: Its deployment (None outside deployments: no worker to lose).
        output_log: Where the process's output goes once its worker is gone.
        on_reconnect: Called (in the watch's thread) with the outage's length in
            seconds when the server answers again after it could not be reached.
        on_unreachable: Called (in the watch's thread) when an outage begins.
    """

    def __init__(
        self,
        run_id: UUID,
        deployment_id: UUID | None,
        output_log: Path,
        on_reconnect: Callable[[float], None] | None = None,
        on_unreachable: Callable[[], None] | None = None,
    ) -> None:
        self.run_id = run_id
        self.deployment_id = deployment_id
        self.output_log = output_log
        self.on_reconnect = on_reconnect
        self.on_unreachable = on_unreachable
        self.interval = watch_interval()
        # Why the watch stopped training ("cancel", "worker", "lease"), None while it has not.
        self.reason: str | None = None
        self.unreachable_since: float | None = None
        self._done = threading.Event()
        # Held while the watch writes a state: stop() waits for it, so that no write of
        # the watch lands after the run's own final state.
        self._writing = threading.Lock()
        self._parent = os.getppid()
        self._readers: list[int] = []
        self._thread: threading.Thread | None = None
        self._recovering: threading.Thread | None = None
        self._renewed: set[Any] = set()  # the leases the watch has renewed

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> "RunWatch":
        if self.deployment_id is not None:
            self._hold_output_pipes()
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._loop,), name="baton-run-watch", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (before the run sets its final state: the watch would undo it)."""
        self._done.set()
        with self._writing:  # a write in flight ends first; none starts after
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=_READ_TIMEOUT_S + 1)
        for fd in self._readers:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._readers.clear()

    # -- the worker ------------------------------------------------------------------

    def _hold_output_pipes(self) -> None:
        """Open a reader of this process's own output pipes: while one is open, a write
        to the pipe cannot fail with a broken pipe, even once the worker is gone.

        Only when the parent is the worker itself: behind a wrapper (``sh -c``, a
        supervisor) the parent would not change when the worker dies, nobody would
        drain the pipe, and a full pipe would block the run instead of ending it."""
        try:
            parent = Path(f"/proc/{self._parent}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return
        if b"worker" not in parent or not any(b"prefect" in part for part in parent):
            return
        for fd in (1, 2):
            try:
                if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                    continue
                self._readers.append(os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK))
            except OSError:
                continue

    def _worker_gone(self) -> bool:
        return bool(self._readers) and os.getppid() != self._parent

    def _after_worker_death(self) -> None:
        """Send the output to a file (nobody reads the pipes now), then stop training."""
        with contextlib.suppress(OSError):
            self.output_log.parent.mkdir(parents=True, exist_ok=True)
            sink = os.open(self.output_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            for fd in (1, 2):
                os.dup2(sink, fd)
            os.close(sink)
        for fd in self._readers:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._readers.clear()
        _log().warning(
            "the worker that started this run (pid %d) is gone: stopping at the end of "
            "the current iteration with an emergency checkpoint; the restart continues it",
            self._parent,
        )
        self._request_stop("worker")

    def _request_stop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            os.kill(os.getpid(), signal.SIGTERM)

    # -- the server ------------------------------------------------------------------

    def _loop(self) -> None:
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

        next_read = time.monotonic()
        with (
            temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}),
            get_client(sync_client=True, httpx_settings={"timeout": _READ_TIMEOUT_S}) as api,
        ):
            while not self._done.wait(_TICK_S):
                if self.reason is None and self._worker_gone():
                    self._after_worker_death()
                if time.monotonic() < next_read:
                    continue
                next_read = time.monotonic() + self.interval
                try:
                    self._look(api)
                except Exception as err:  # any failure to read counts as an outage
                    self._unreachable(err)

    def _look(self, api: Any) -> None:
        run = api.read_flow_run(self.run_id)
        state = run.state
        if state is not None and not self._done.is_set():
            self._renew_lease(api, state)
            if state.is_cancelling():
                if self.reason is None:
                    _log().info("cancel requested: stopping at the end of the current iteration")
                self._request_stop("cancel")
            elif state.is_running() and state.name == SILENT:
                self._correct(api, state)
            elif state.is_crashed() and self.reason is None:
                # Marked Crashed while alive: the mark revoked the run's slot and the
                # automation's restart is on its way. Undoing the mark would leave a run
                # without a slot; stop instead (an emergency checkpoint), and the restart,
                # which waits for the experiment's lock, continues from it.
                _log().warning(
                    "the server marked this live run Crashed (%s): stopping with an "
                    "emergency checkpoint; its restart continues",
                    state.message or "no message",
                )
                self._request_stop("crashed")
        self._reachable()

    def _renew_lease(self, api: Any, state: Any) -> None:
        """Hold the run's concurrency lease for LEASE_S more (see the module's doc).

        A lease is taken for lost only after the watch has renewed it once: the lease a
        run starts with is the server's to hand over, and a first refusal proves nothing
        about it."""
        lease = state.state_details.deployment_concurrency_lease_id
        if lease is None or self.reason is not None or not state.is_running():
            return
        try:
            api.renew_concurrency_lease(lease_id=lease, lease_duration=LEASE_S)
        except httpx.HTTPStatusError as err:
            if err.response.status_code not in (404, 410) or lease not in self._renewed:
                return  # Prefect's own renewal still holds it
            _log().warning(
                "the server lost this run's concurrency lease (a Crashed mark revoked it, or "
                "the server keeps leases in memory and was restarted: start it with "
                "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect.server.concurrency."
                "lease_storage.filesystem); Prefect would end the run at its next renewal, "
                "so it stops now with an emergency checkpoint and its restart continues"
            )
            self._request_stop("lease")
        else:
            self._renewed.add(lease)

    def _unreachable(self, err: Exception) -> None:
        if self.unreachable_since is None:
            self.unreachable_since = time.monotonic()
            if self.on_unreachable is not None:
                self.on_unreachable()
            _log().warning(
                "the Prefect server does not answer (%s): training goes on, and what it "
                "misses is sent again when it is back",
                type(err).__name__,
            )

    def _reachable(self) -> None:
        if self.unreachable_since is None:
            return
        if self._recovering is not None:
            return  # what the server missed is being sent
        outage = time.monotonic() - self.unreachable_since
        _log().info("the Prefect server answers again after %.0f s", outage)

        def recover() -> None:
            try:
                if self.on_reconnect is not None:
                    self.on_reconnect(outage)
            except Exception as err:
                _log().warning("could not send again what the server missed: %s", err)
            finally:
                # Cleared last: wait_for_server returns once what the server missed is sent.
                self.unreachable_since = None
                self._recovering = None

        # In a thread of its own: the watch goes on reading the run's state meanwhile.
        context = contextvars.copy_context()
        self._recovering = threading.Thread(
            target=context.run, args=(recover,), name="baton-run-recover", daemon=True
        )
        self._recovering.start()

    def wait_for_server(self, timeout: float) -> bool:
        """Block until the server answers and has been sent what it missed (at once when
        it answered the last read); False when ``timeout`` seconds pass first."""
        deadline = time.monotonic() + timeout
        announced = False
        while self.unreachable_since is not None and time.monotonic() < deadline:
            if not announced:
                announced = True
                _log().warning(
                    "training is done; waiting up to %.0f s for the Prefect server to "
                    "record the run's end",
                    timeout,
                )
            time.sleep(_TICK_S)
        return self.unreachable_since is None

    def _correct(self, api: Any, state: Any) -> None:
        """This run is alive: set it Running again, saying why."""
        from prefect.states import Running

        with self._writing:
            if self._done.is_set():
                return
            api.set_flow_run_state(
                self.run_id,
                Running(
                    message=f"Still training: the server marked this run {state.name} "
                    f"({state.message or 'no message'}) while it could not hear it."
                ),
                # Not forced: a Silent run being cancelled meanwhile stays Cancelling.
                force=False,
            )
        _log().warning("the server had marked this live run %s; set it Running again", state.name)
