"""Prefect's embedded server for ``baton run``, booted while the run imports the rest.

Without an API URL, Prefect starts a temporary server the first time a flow needs one:
after the run has imported torch, the engine and Prefect, the server process then
spends ~4 s importing its own modules and starting, and this process imports the
server's modules too (~2 s) only to launch it. Here the same server (the same command,
settings and ephemeral mode Prefect uses) is launched first and boots on another core
while the run loads; the run then talks to it as to any API URL.

The server is stopped only once it has recorded the run. A client's task-run events
travel over a websocket into the server's in-memory queues, and two services write
them to the database later: the task-run recorder (which makes the task runs the UI
shows) and the event persister (in batches, every few seconds). A server stopped as
soon as the client has sent everything loses what those queues still hold: a run in
the UI without its last epochs, and "Error flushing N events" at shutdown. So
``prefect_api`` notes every event and log line this process sends (`RunRecord`),
drains Prefect's client workers when the run ends, and reads the server's API until
every one of them is in the database, or until a bounded wait ends, which it reports.

The server also stops when this process exits, and it gets SIGTERM from the kernel if
the run is killed, so it never outlives its run.
"""

import atexit
import contextlib
import errno
import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from baton.flows.run_record import RunRecord, missing_from, recording
from baton.lifetime import die_with_parent

STARTUP_TIMEOUT_S = 120.0
# How long a finished run waits for the server to record it. Normally well under a
# second; a few seconds when both cores are busy.
RECORD_TIMEOUT_S = 60.0
# A wait longer than this is announced, so that a slow end of a run is not a silent one.
_RECORD_NOTICE_S = 3.0
# uvicorn exits with this code when it cannot start, a port taken since it was picked
# among the reasons; Prefect's own launcher then starts again on another port.
_UVICORN_STARTUP_FAILURE = 3
_PORT_ATTEMPTS = 5
# The event persister writes its queue every 5 s by default: each run would end with
# up to 5 s of waiting for its last events.
_SERVER_SETTINGS = {"PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "0.25"}


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_taken(port: int) -> bool:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as err:
            return err.errno == errno.EADDRINUSE
        return False


class EmbeddedServer:
    """One Prefect server process on 127.0.0.1, owned by this process.

    Args:
        port: The port to try first (default: a free one). If another process takes it
            before the server binds it, the server starts again on a free port.
    """

    def __init__(self, port: int | None = None) -> None:
        # Launched before this process imports Prefect (a second saved): the server reads
        # the same environment and profile as this process would.
        spec = importlib.util.find_spec("prefect")
        if spec is None or spec.origin is None:
            raise RuntimeError("Prefect is not installed")
        self._app_dir = str(Path(spec.origin).parent.parent)
        self._launch(port or _free_port())
        # The last resort (a run that never reached `prefect_api`'s end): Prefect's log
        # and event workers drain when threads shut down, before atexit handlers.
        atexit.register(self.stop)

    def _launch(self, port: int) -> None:
        self.port = port
        self.api_url = f"http://127.0.0.1:{port}/api"
        env = {
            **_SERVER_SETTINGS,
            **os.environ,
            # What Prefect's own temporary server runs with: no UI, ephemeral services.
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
        }
        env.pop("PREFECT_API_URL", None)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                self._app_dir,
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            # in the child between fork and exec: SIGTERM when this process dies
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        )

    def wait_until_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Block until the API answers; raise with the exit code if the server died.

        A server that could not bind its port because another process took it since
        it was picked starts again on a free port, as Prefect's own launcher does.
        """
        deadline = time.monotonic() + timeout
        attempts = 1
        with httpx.Client() as client:
            while time.monotonic() < deadline:
                code = self.process.poll()
                if (
                    code == _UVICORN_STARTUP_FAILURE
                    and attempts < _PORT_ATTEMPTS
                    and _port_taken(self.port)
                ):
                    taken, attempts = self.port, attempts + 1
                    self._launch(_free_port())
                    print(
                        f"baton: port {taken} was taken before Prefect's embedded server "
                        f"bound it; starting it again on port {self.port}",
                        file=sys.stderr,
                        flush=True,
                    )
                    continue
                if code is not None:
                    raise RuntimeError(
                        f"Prefect's embedded server exited with code {code} before it "
                        f"answered on {self.api_url}; its output is above"
                    )
                with contextlib.suppress(httpx.TransportError):
                    if client.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                        return
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"Prefect's embedded server did not answer within {timeout:.0f} s")

    def wait_for_record(self, record: RunRecord, timeout: float = RECORD_TIMEOUT_S) -> RunRecord:
        """Send what Prefect's client still holds, then wait until the server's database
        has everything in ``record``; return what it lacks when ``timeout`` ends (empty
        when it has everything).

        Call with Prefect pointed at this server (inside ``prefect_api``).
        """
        from prefect.client.orchestration import get_client
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        deadline = time.monotonic() + timeout
        # Stopping the workers sends what they hold and closes the events websocket. The
        # events worker that sends can be started again by the one that forwards to it
        # while both stop, hence a second round; logs last, for what draining logged.
        for worker in (EventsWorker, EventsWorker, APILogWorker):
            worker.drain_all(timeout=max(deadline - time.monotonic(), 0.0), at_exit=False)
        expected = record.copy()
        announced = False
        with get_client(sync_client=True) as server_api:
            while True:
                # A busy server's timeout or error: ask again until the deadline.
                with contextlib.suppress(httpx.HTTPError):
                    expected = missing_from(server_api, expected)
                if not expected or time.monotonic() >= deadline:
                    return expected
                if not announced and deadline - time.monotonic() < timeout - _RECORD_NOTICE_S:
                    announced = True
                    print(
                        f"baton: waiting up to {timeout:.0f} s for Prefect's embedded server "
                        f"to record the run ({expected.summary()} to go)",
                        file=sys.stderr,
                        flush=True,
                    )
                time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM and wait (the server writes its queued events first), then SIGKILL."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def configured_api_url() -> str | None:
    """The API URL from the environment or the active Prefect profile, if any (imports
    Prefect)."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


@contextlib.contextmanager
def prefect_api(server: EmbeddedServer | None) -> Iterator[None]:
    """Point this process's Prefect client at ``server`` (no-op without one), and stop
    the server once it has recorded everything sent to it (or after a bounded wait,
    reported on stderr).

    A run on its own embedded server also sends no flow heartbeats: nothing watches them
    there, and the heartbeat thread adds up to a second to the end of every run.
    """
    if server is None:
        yield
        return
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        temporary_settings,
    )

    try:
        server.wait_until_ready()
        record = RunRecord()
        with (
            temporary_settings(
                {PREFECT_API_URL: server.api_url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
            ),
            recording(record),
        ):
            try:
                yield
            finally:
                _report(record, server.wait_for_record(record))
    finally:
        server.stop()


def _report(record: RunRecord, missing: RunRecord) -> None:
    if missing:
        print(
            f"baton: Prefect's embedded server had not recorded {missing.summary()} "
            f"of {record.summary()} after {RECORD_TIMEOUT_S:.0f} s; stopped it anyway, "
            "so the run's history in Prefect is incomplete (its checkpoints and metrics "
            "are not). For complete histories on a busy machine, run against a "
            "long-lived server: prefect server start, then "
            "PREFECT_API_URL=http://127.0.0.1:4200/api baton run ...",
            file=sys.stderr,
            flush=True,
        )
