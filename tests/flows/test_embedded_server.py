"""`baton run` on its own embedded Prefect server: the run is fully recorded, the server
never outlives the run (normal exit, bad config, SIGKILL of the run)."""

import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from ..processes import children, wait_gone
from .conftest import small_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path_factory.mktemp("prefect_home")),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONPATH=str(ROOT),
    )
    return env


def write(tmp_path, cfg) -> str:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def start_run(tmp_path, cfg, env, **popen) -> subprocess.Popen:
    """`baton run` of ``cfg`` in a new process."""
    return subprocess.Popen(
        [sys.executable, "-m", "baton.flows.cli", "run", write(tmp_path, cfg)],
        cwd=ROOT,
        env=env,
        **popen,
    )


# A run log line on the console: "12:00:00.000 | INFO    | Task run 'train-epoch-1' - text".
RUN_LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \| \w+ +\| (?:Flow|Task) run '[^']+' - (.*)$")


def test_run_is_recorded_and_the_server_stops_with_it(tmp_path, prefect_env):
    cfg = small_config(tmp_path / "wd", **{"train.max_epochs": 2})
    result = subprocess.run(
        [sys.executable, "-m", "baton.flows.cli", "run", write(tmp_path, cfg)],
        cwd=ROOT,
        env=prefect_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "exp: epoch 2/2" in output
    # Nothing was left in the server's queues when it stopped, and nothing was refused.
    assert "Error flushing" not in output, output
    assert "Error logging to API" not in output, output
    assert "had not recorded" not in output, output
    db = sqlite3.connect(Path(prefect_env["PREFECT_HOME"]) / "prefect.db")
    try:
        (flow_run_id, state), *_ = db.execute(
            "select id, state_type from flow_run order by created desc"
        ).fetchall()
        assert state == "COMPLETED"
        # Every task run, in its final state, from the task-run recorder.
        task_runs = dict(
            db.execute(
                "select name, state_type from task_run where flow_run_id = ?", (flow_run_id,)
            ).fetchall()
        )
        epochs = [f"{step}-epoch-{e}" for e in (1, 2) for step in ("train", "evaluate")]
        checkpoints = [f"save-checkpoint-epoch-{e}" for e in (1, 2)]
        assert {re.sub(r"-[0-9a-f]{3}$", "", n) for n in task_runs} == {
            "validate-config",
            "find-resume-point-exp",
            "prepare-exp",
            "summarize",
            *epochs,
            *checkpoints,
        }, task_runs
        assert set(task_runs.values()) == {"COMPLETED"}, task_runs
        # Every state of every task run, both as a task-run state (the recorder) and as
        # an event (the event persister): the recorder stores each state under the id of
        # the event that reported it.
        states = set(
            db.execute(
                "select s.id from task_run_state s join task_run t on s.task_run_id = t.id "
                "where t.flow_run_id = ?",
                (flow_run_id,),
            ).fetchall()
        )
        events = set(
            db.execute(
                "select id from events where event like 'prefect.task-run.%' and related like ?",
                (f"%prefect.flow-run.{flow_run_id}%",),
            ).fetchall()
        )
        assert len(states) >= 3 * len(task_runs)  # Pending, Running, Completed at least
        assert states == events
        # Every run log line the console showed, the last ones included.
        logs = [
            m
            for (m,) in db.execute("select message from log where flow_run_id = ?", (flow_run_id,))
        ]
        shown = [m.group(1) for m in map(RUN_LOG_LINE.match, output.splitlines()) if m]
        # Prefect prints the run's UI link on the console only (not to the API).
        shown = [line for line in shown if not line.startswith("View at ")]
        assert any("Finished in state Completed()" in m for m in shown)
        assert [line for line in shown if not any(m.startswith(line) for m in logs)] == []
        assert len(logs) >= len(shown)
    finally:
        db.close()


def test_bad_config_starts_no_lasting_server(tmp_path, prefect_env):
    cfg = small_config(tmp_path / "wd")
    cfg["train"]["max_epochs"] = 0
    process = start_run(
        tmp_path, cfg, prefect_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    server = []
    while process.poll() is None and not server:
        server = children(process.pid)
        time.sleep(0.01)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2 and "train.max_epochs" in err
    assert not wait_gone(server, timeout=10)
    assert not (tmp_path / "wd").exists()


def test_killed_run_takes_its_server_with_it(tmp_path, prefect_env):
    cfg = small_config(
        tmp_path / "wd",
        model={
            "type": "tests.faults.SlowMLP",
            "in_features": 8,
            "num_classes": 3,
            "hidden": [16],
            "delay": 0.05,
        },
        **{"train.max_epochs": 50},
    )
    metrics = Path(cfg["work_dir"]) / cfg["experiment_name"] / "metrics.jsonl"
    process = start_run(
        tmp_path, cfg, prefect_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 180
        while not metrics.exists() and time.monotonic() < deadline:
            assert process.poll() is None, "the run ended before it trained"
            time.sleep(0.1)
        assert metrics.exists(), "the run never finished an epoch"
        server = children(process.pid)
        assert server, "no embedded server process under the run"
    finally:
        os.kill(process.pid, signal.SIGKILL)  # the run only: no process group kill
        process.wait(timeout=30)
    assert not wait_gone(server, timeout=30), "the embedded server outlived its run"


def test_a_taken_port_is_retried_and_an_unrecorded_run_is_reported(monkeypatch, tmp_path):
    """The server binds another port when its pick was taken in between (uvicorn exits
    3, as Prefect's launcher expects); and the wait for a run's record ends, naming
    what the server lacks."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from baton.flows.server import EmbeddedServer, RunRecord

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect_home"))
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        server = EmbeddedServer(port=taken)
        try:
            server.wait_until_ready()
            assert server.port != taken
            never_sent = RunRecord()
            never_sent.add_log({"flow_run_id": str(uuid.uuid4()), "message": "lost"})
            with temporary_settings({PREFECT_API_URL: server.api_url}):
                missing = server.wait_for_record(never_sent, timeout=0.5)
            assert missing.summary() == "0 events, 0 task-run states, 1 log lines"
        finally:
            server.stop()
    assert server.process.returncode is not None
