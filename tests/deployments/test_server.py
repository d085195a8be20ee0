"""Deployments end to end on a real ``prefect server`` on 127.0.0.1 with real workers.

Everything the tests start (server, workers) runs in its own process group and is
stopped by process id, also when a test fails.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from baton.config import validate
from baton.run import pipeline as pl
from baton.tasks._common import artifact_key

from ..flows.conftest import small_config
from ..flows.helpers import assert_same_training_result, final_checkpoint, flaky

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).parent / "prefect")
POOL = "baton-gpu0"
TEMPLATE = "deployments/pool-template.json"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)


class _RetryBusyDatabase(httpx.HTTPTransport):
    """Send a request again when the server answers 503: its SQLite database was busy and
    the transaction rolled back (Prefect's own client retries these the same way)."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for delay in (0.5, 1, 2, 4, 8):
            response = super().handle_request(request)
            if response.status_code != 503:
                return response
            response.close()
            time.sleep(delay)
        return super().handle_request(request)


class Server:
    def __init__(self, home: Path, ui: bool = False):
        port = _free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.url = f"{self.base}/api"
        # Each deployment's runs write their experiments in a folder of their own here.
        self.work = home / "work"
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": self.url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PYTHONPATH": str(ROOT),
            "BATON_PROJECT_DIR": str(ROOT),
            "BATON_DEPLOYMENTS_WORK_DIR": str(self.work),
            # as deployments/README.md starts the server: leases outlive a restart
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": LEASE_STORAGE,
            # the UI bundle is copied here, not into site-packages
            "PREFECT_UI_STATIC_DIRECTORY": str(home / "ui"),
        }
        self.ui = ui
        self.http = httpx.Client(base_url=self.url, timeout=30, transport=_RetryBusyDatabase())
        self.up()

    def up(self) -> None:
        """Start the server (again: on the same port and database) and wait until it answers."""
        port = self.url.rsplit(":", 1)[1].split("/")[0]
        command = [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", port]
        self.process = subprocess.Popen(
            [*command, "--analytics-off", "--ui" if self.ui else "--no-ui"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.time() + 120
        while time.time() < deadline and self.process.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if self.http.get("/health").status_code == 200:
                    return
            time.sleep(0.3)
        raise RuntimeError(f"prefect server did not start (exit code {self.process.poll()})")

    def down(self) -> None:
        """Stop the server as an operator would for an upgrade (SIGTERM, then wait)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            _stop(self.process)

    def cli(self, *args, timeout=180) -> str:
        out = subprocess.run(
            [PREFECT, *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        return out.stdout

    def create_pool(self) -> None:
        """The work pool as deployments/README.md creates it, from baton's template."""
        self.cli("work-pool", "create", POOL, "--type", "process", "--base-job-template", TEMPLATE)

    def work_dir(self, deployment: str) -> Path:
        """The folder a deployment's runs keep their experiments in."""
        return self.work / deployment

    def deployment(self, name: str) -> dict:
        response = self.http.get(f"/deployments/name/{name}")
        response.raise_for_status()
        return response.json()

    def create_run(self, deployment: str, parameters: dict) -> str:
        dep = self.deployment(deployment)
        response = self.http.post(
            f"/deployments/{dep['id']}/create_flow_run", json={"parameters": parameters}
        )
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def run(self, run_id: str) -> dict:
        return self.http.get(f"/flow_runs/{run_id}").json()

    def state(self, run_id: str) -> str:
        return self.run(run_id)["state"]["type"]

    def wait_state(self, run_id: str, states: set[str], timeout: float) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.state(run_id)
            if state in states:
                return state
            time.sleep(0.5)
        raise AssertionError(f"run {run_id} still {self.state(run_id)} after {timeout} s")

    def worker(self, *extra) -> subprocess.Popen:
        return subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", POOL, *extra],
            env=self.env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def serve_once(self, timeout=300) -> None:
        worker = self.worker("--run-once")
        try:
            worker.wait(timeout=timeout)
        finally:
            _stop(worker)

    def artifacts(self, run_id: str) -> dict[str, dict]:
        response = self.http.post(
            "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}
        )
        return {a["key"]: a for a in response.json() if a["key"]}

    def close(self) -> None:
        self.http.close()
        _stop(self.process)


@contextlib.contextmanager
def deployed_server(home: Path) -> Iterator[Server]:
    """A server with the pool and every deployment of deployments/prefect.yaml."""
    instance = Server(home)
    try:
        instance.create_pool()
        instance.cli("--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--all")
        yield instance
    finally:
        instance.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with deployed_server(tmp_path_factory.mktemp("prefect_home")) as instance:
        yield instance


def ui_parameters(cfg: dict) -> dict:
    """What the UI's run form sends: every parameter, defaults filled in."""
    return {
        "config": cfg,
        "overrides": [],
        "experiment_name": None,
        "resume": None,
        "work_dir": None,
        "fork": None,
        "nproc": None,
        "restart_of": None,
    }


def test_deployments_are_registered_with_a_typed_form(server):
    ui = server.deployment("train-pipeline/train-from-ui")
    schema = ui["parameter_openapi_schema"]["properties"]
    assert set(schema) == {
        "config",
        "overrides",
        "experiment_name",
        "resume",
        "work_dir",
        "fork",
        "nproc",
        "restart_of",
    }
    assert all(schema[name].get("description") for name in schema)
    assert {"type": "integer"} in schema["nproc"]["anyOf"]  # the form takes a number
    assert ui["work_pool_name"] == POOL
    nightly = server.deployment("train-pipeline/nightly-digits-mlp")
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 3 * * *"]
    assert nightly["global_concurrency_limit"]["limit"] == 1
    assert ui["pull_steps"][0]["prefect.deployments.steps.set_working_directory"][
        "directory"
    ] == str(ROOT)


def test_run_from_the_ui_form_completes(server, tmp_path):
    cfg = small_config(tmp_path / "wd", name="from-ui")
    run_id = server.create_run("train-pipeline/train-from-ui", ui_parameters(cfg))
    server.serve_once()
    assert server.state(run_id) == "COMPLETED"
    experiment = server.work_dir("train-pipeline/train-from-ui") / "from-ui"
    assert not (tmp_path / "wd").exists()  # the config's work_dir does not apply
    assert (experiment / "manifest.json").exists()
    assert len(list((experiment / "checkpoints").glob("epoch_*.pth"))) == 4
    keys = set(server.artifacts(run_id))
    assert {artifact_key("from-ui", s) for s in ("checkpoint", "metrics", "summary")} <= keys


def test_a_bad_parameter_is_refused_by_the_server(server):
    dep = server.deployment("train-pipeline/train-from-ui")
    response = server.http.post(
        f"/deployments/{dep['id']}/create_flow_run",
        json={"parameters": {"overrides": "not-a-list"}},
    )
    assert response.status_code == 409 and "overrides" in response.text


def test_failing_task_is_retried_and_resumes_exactly(server, tmp_path):
    model = flaky(tmp_path, failures=1)
    cfg = small_config(tmp_path / "wd", name="flaky", model=model)
    run_id = server.create_run("train-pipeline/train-from-ui", ui_parameters(cfg))
    server.serve_once()
    assert server.state(run_id) == "COMPLETED"
    assert (tmp_path / "budget").read_text() == "1"
    (tmp_path / "spent").write_text("9")
    reference = small_config(
        tmp_path / "ref", name="flaky", model={**model, "budget": str(tmp_path / "spent")}
    )
    pl.run(validate(reference))
    deployed = {**cfg, "work_dir": str(server.work_dir("train-pipeline/train-from-ui"))}
    assert_same_training_result(final_checkpoint(reference), final_checkpoint(deployed))


def test_two_queued_runs_run_one_after_the_other(server, tmp_path):
    slow = {
        "type": "tests.faults.SlowMLP",
        "in_features": 8,
        "num_classes": 3,
        "hidden": [16],
        "delay": 0.02,
    }
    runs = [
        server.create_run(
            "train-pipeline/train-from-ui",
            ui_parameters(small_config(tmp_path / f"wd{i}", name=f"queued-{i}", model=slow)),
        )
        for i in range(2)
    ]
    worker = server.worker()
    try:
        for run_id in runs:
            assert server.wait_state(run_id, TERMINAL, timeout=240) == "COMPLETED"
    finally:
        _stop(worker)
    spans = sorted((server.run(r)["start_time"], server.run(r)["end_time"]) for r in runs)
    assert spans[0][1] <= spans[1][0], f"runs overlapped: {spans}"


DEPLOY = [PREFECT, "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml"]


def _deploy_from_root(server, name: str, **env) -> subprocess.CompletedProcess:
    """`prefect deploy` of one deployment from the project root, BATON_PROJECT_DIR as
    given (unset if not given)."""
    environment = {k: v for k, v in server.env.items() if k != "BATON_PROJECT_DIR"}
    return subprocess.run(
        [*DEPLOY, "-n", name],
        env={**environment, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_deploying_without_a_project_dir_runs_in_the_deploy_folder(server, tmp_path):
    deployed = _deploy_from_root(server, "train-from-ui")
    assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]
    assert "BATON_PROJECT_DIR is not set" in deployed.stdout + deployed.stderr
    (step,) = server.deployment("train-pipeline/train-from-ui")["pull_steps"]
    assert step == {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
    # A worker that knows nothing of the variable either runs it.
    cfg = small_config(tmp_path / "wd", name="default-dir", **{"train.max_epochs": 1})
    run_id = server.create_run("train-pipeline/train-from-ui", ui_parameters(cfg))
    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", POOL, "--run-once"],
        env={k: v for k, v in server.env.items() if k != "BATON_PROJECT_DIR"},
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        worker.wait(timeout=300)
    finally:
        _stop(worker)
    assert server.state(run_id) == "COMPLETED"


@pytest.mark.parametrize("value", ["work/baton", ""])
def test_deploying_with_a_relative_project_dir_is_refused(server, value):
    before = server.deployment("evaluate-checkpoint/evaluate")
    deployed = _deploy_from_root(server, "evaluate", BATON_PROJECT_DIR=value)
    output = deployed.stdout + deployed.stderr
    assert deployed.returncode != 0
    assert f"BATON_PROJECT_DIR='{value}' is not an absolute path" in output, output
    assert server.deployment("evaluate-checkpoint/evaluate")["updated"] == before["updated"]
