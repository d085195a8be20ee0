"""`baton run` on its own embedded Prefect server: the run is fully recorded, the server
never outlives the run (normal exit, bad config, SIGKILL of the run)."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

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
        [sys.executable, "-m", "flows.cli", "run", write(tmp_path, cfg)],
        cwd=ROOT,
        env=env,
        **popen,
    )


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pids, timeout=30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def test_run_is_recorded_and_the_server_stops_with_it(tmp_path, prefect_env):
    cfg = small_config(tmp_path / "wd", **{"train.max_epochs": 2})
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", write(tmp_path, cfg)],
        cwd=ROOT,
        env=prefect_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # The client shipped everything before the server stopped. (A traceback from the
    # server's task-run recorder, cancelled mid-flush by the shutdown, can appear: that is
    # Prefect's own shutdown, which retries the batch; its temporary server does the same.)
    assert "Error logging to API" not in output
    assert "exp: epoch 2/2" in output
    # The flow run's final state, the task runs, and the run's log lines (shipped last,
    # at exit) are in the server's database.
    db = sqlite3.connect(Path(prefect_env["PREFECT_HOME"]) / "prefect.db")
    try:
        (flow_run_id, state), *_ = db.execute(
            "select id, state_type from flow_run order by created desc"
        ).fetchall()
        assert state == "COMPLETED"
        task_runs = db.execute(
            "select name, state_type from task_run where flow_run_id = ?", (flow_run_id,)
        ).fetchall()
        names = {name for name, _ in task_runs}
        assert {"train-epoch-1", "train-epoch-2"} <= names
        logs = [
            m
            for (m,) in db.execute("select message from log where flow_run_id = ?", (flow_run_id,))
        ]
        assert any("Finished in state Completed()" in m for m in logs)
        assert any("epoch 2:" in m for m in logs)
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
