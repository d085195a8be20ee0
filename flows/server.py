"""Prefect's embedded server for ``baton run``, booted while the run imports the rest.

Without an API URL, Prefect starts a temporary server the first time a flow needs one:
after the run has imported torch, the engine and Prefect, the server process then
spends ~4 s importing its own modules and starting, and this process imports the
server's modules too (~2 s) only to launch it. Here the same server (the same command,
settings and ephemeral mode Prefect uses) is launched first and boots on another core
while the run loads; the run then talks to it as to any API URL.

The server is stopped (SIGTERM, so it records the last events) when the process exits,
after Prefect has shipped the last logs and events, and it gets SIGTERM from the kernel
if the run is killed, so it never outlives its run.
"""

import atexit
import contextlib
import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

STARTUP_TIMEOUT_S = 120.0
_PR_SET_PDEATHSIG = 1


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedServer:
    """One Prefect server process on 127.0.0.1, owned by this process."""

    def __init__(self) -> None:
        # Launched before this process imports Prefect (a second saved): the server reads
        # the same environment and profile as this process would.
        spec = importlib.util.find_spec("prefect")
        if spec is None or spec.origin is None:
            raise RuntimeError("Prefect is not installed")
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        env = {
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
                str(Path(spec.origin).parent.parent),
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        # Stopped at exit, as Prefect stops its own: after Prefect's log and event
        # workers have shipped their last batches (they drain when threads shut down,
        # which comes before atexit handlers).
        atexit.register(self.stop)

    def wait_until_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Block until the API answers; raise with the exit code if the server died."""
        deadline = time.monotonic() + timeout
        with httpx.Client() as client:
            while time.monotonic() < deadline:
                code = self.process.poll()
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
    """Point this process's Prefect client at ``server`` (no-op without one).

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

    server.wait_until_ready()
    with temporary_settings(
        {PREFECT_API_URL: server.api_url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    ):
        yield
