"""Crashed runs are started again by deployments/automations.yaml, on a real server.

The server and workers run with shortened timers (heartbeat automation ``within``,
proactive evaluation, worker polling) set through Prefect's settings, so a crash is
noticed and restarted in about a minute instead of several.
"""

import contextlib
import inspect
import json
import os
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from baton.config import validate
from baton.flows.train import restart_name, train_pipeline
from baton.run import pipeline as pl

from ..faults import forwards_so_far
from ..flows.conftest import small_config
from ..flows.helpers import assert_same_training_result, final_checkpoint
from .test_server import ROOT, TERMINAL, Server, _stop, ui_parameters

AUTOMATIONS = ROOT / "deployments" / "automations.yaml"
SILENT_WITHIN = 40  # s without a heartbeat before a run is marked Silent (90 deployed)
CRASH_WITHIN = 15  # s more before a Silent run is marked Crashed (30 deployed)
RESTART_LIMIT = 1  # the bound the workers get here (3 by default): one run fewer


def _automations() -> dict:
    return yaml.safe_load(AUTOMATIONS.read_text())


def _restart_action() -> dict:
    (automation,) = [a for a in _automations()["automations"] if a["name"].startswith("baton-rest")]
    (action,) = automation["actions"]
    return action


def test_the_restart_automation_passes_every_flow_parameter():
    """A parameter missing from the action would silently fall back to the deployment's."""
    parameters = inspect.signature(train_pipeline.fn).parameters
    assert set(_restart_action()["parameters"]) == set(parameters)
    assert _restart_action()["source"] == "inferred"  # the crashed run's own deployment


@pytest.mark.parametrize(
    ("crashed", "restart"),
    [
        ("brave-fox", "brave-fox-restart-1"),
        ("brave-fox-restart-1", "brave-fox-restart-2"),
        ("brave-fox-restart-12", "brave-fox-restart-13"),
        ("a b/../c", "a-b-..-c-restart-1"),
        ("x" * 500, "x" * 80 + "-restart-1"),
    ],
)
def test_a_restart_is_named_after_the_run_it_continues(crashed, restart):
    assert restart_name(crashed) == restart


@contextlib.contextmanager
def automated_server(home: Path, **settings: str) -> Iterator[Server]:
    """A server with the pool, the deployments and deployments/automations.yaml, timers
    shortened through Prefect's settings and the heartbeat windows."""
    settings = {
        "PREFECT_SERVER_EVENTS_PROACTIVE_GRANULARITY": "PT1S",  # 5 s by default
        "PREFECT_WORKER_QUERY_SECONDS": "1",  # 10 s by default
        # the workers' environment, as deployments/README.md starts them
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
        "PREFECT_CLIENT_MAX_RETRIES": "6",
        **settings,
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in settings.items():
            patch.setenv(name, value)
        instance = Server(home)
    try:
        instance.create_pool()
        instance.cli("--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--all")
        automations = _automations()
        windows = {"baton-mark-silent-runs": SILENT_WITHIN, "baton-crash-silent-runs": CRASH_WITHIN}
        for automation in automations["automations"]:
            if automation["name"] in windows:
                automation["trigger"]["within"] = windows.pop(automation["name"])
        assert not windows, f"automations.yaml has no {sorted(windows)}"
        instance.cli("automation", "create", "--from-json", json.dumps(automations))
        yield instance
    finally:
        instance.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect_home")
    with automated_server(home, BATON_RESTART_LIMIT=str(RESTART_LIMIT)) as instance:
        yield instance


def _flow_run_processes(run_id: str) -> list[int]:
    """Processes executing a flow run (the worker starts them in a session of their own)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if f"PREFECT__FLOW_RUN_ID={run_id}".encode() in (proc / "environ").read_bytes():
                pids.append(int(proc.name))
    return pids


def _runs_named(server: Server, name: str) -> dict[str, dict]:
    """The run called ``name`` and its restarts (``like_`` also matches names that merely
    contain ``name``: another run's ``bored-fox`` for ``red-fox``)."""
    response = server.http.post("/flow_runs/filter", json={"flow_runs": {"name": {"like_": name}}})
    response.raise_for_status()
    return {
        run["name"]: run
        for run in response.json()
        if run["name"] == name or run["name"].startswith(f"{name}-restart-")
    }


def _wait_for_run(server: Server, name: str, states: set[str], timeout: float) -> dict:
    """Wait, reading only, until the run called ``name`` exists and is in ``states``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        run = _runs_named(server, name).get(name)
        if run and run["state"]["type"] in states:
            return run
        time.sleep(0.5)
    seen = {
        n: r["state"]["type"] for n, r in _runs_named(server, name.split("-restart")[0]).items()
    }
    raise AssertionError(f"no run {name!r} in {states} after {timeout} s; runs: {seen}")


def _history(server: Server, run_id: str) -> list[str]:
    """The run's states, oldest first, for failure messages."""
    states = server.http.get("/flow_run_states/", params={"flow_run_id": run_id}).json()
    return [f"{s['timestamp']} {s['name']}: {s['message']}" for s in states]


def _seconds(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


@pytest.mark.slow
@pytest.mark.integration
def test_a_killed_run_and_worker_are_restarted_and_end_bitwise_equal(server, tmp_path):
    progress = tmp_path / "forwards"
    slow = {
        "type": "tests.faults.SlowMLP",
        "in_features": 8,
        "num_classes": 3,
        "hidden": [16],
        "dropout": 0.2,
        # 20 forwards after the kill point take 4 s: time to find and kill the process
        "delay": 0.2,
        "progress": str(progress),
    }
    cfg = small_config(tmp_path / "wd", name="restarted", model=slow)
    first = server.create_run("train-pipeline/train-from-ui", ui_parameters(cfg))
    worker = server.worker()
    try:
        deadline = time.time() + 180
        while forwards_so_far(progress) < 8 + 4 and time.time() < deadline:  # inside epoch 2
            time.sleep(0.05)
        assert forwards_so_far(progress) >= 12, "the run never reached epoch 2"
        assert _flow_run_processes(first), "could not find the flow run's process"
    finally:
        # SIGKILL the flow process and the worker, as a dying machine would: nothing reports it
        for pid in _flow_run_processes(first):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _stop(worker)
    killed = time.time()
    worker = server.worker()  # a fresh worker; from here on the test only reads
    try:
        name = server.run(first)["name"]
        restarted = _wait_for_run(server, f"{name}-restart-1", TERMINAL, timeout=240)
    finally:
        _stop(worker)
    done = time.time()
    crashed = server.run(first)
    assert crashed["state"]["type"] == "CRASHED"
    assert restarted["state"]["type"] == "COMPLETED", restarted["state"]["message"]
    assert restarted["parameters"] == {**ui_parameters(cfg), "restart_of": first}
    print(
        f"\nkill -> marked Crashed {crashed['state']['timestamp']}: "
        f"{_seconds(crashed['start_time'], crashed['state']['timestamp']):.0f} s after start; "
        f"Crashed -> restart created {_seconds(crashed['state']['timestamp'], restarted['created']):.1f} s, "
        f"-> restart started {_seconds(crashed['state']['timestamp'], restarted['start_time']):.1f} s, "
        f"-> Completed {_seconds(crashed['state']['timestamp'], restarted['end_time']):.1f} s; "
        f"kill -> Completed {done - killed:.0f} s (wall, polled)"
    )
    reference = small_config(tmp_path / "ref", name="restarted", model={**slow, "progress": None})
    pl.run(validate(reference))
    deployed = {**cfg, "work_dir": str(server.work_dir("train-pipeline/train-from-ui"))}
    assert final_checkpoint(deployed)["meta"]["epoch"] == 4
    assert_same_training_result(final_checkpoint(reference), final_checkpoint(deployed))


@pytest.mark.slow
@pytest.mark.integration
def test_a_cancelled_run_is_left_alone_and_a_crash_loop_stops_at_the_bound(server, tmp_path):
    slow = {"type": "tests.faults.SlowMLP", "in_features": 8, "num_classes": 3, "hidden": [16]}
    progress = tmp_path / "forwards"
    cancelled_cfg = small_config(
        tmp_path / "wd", name="cancelled", model={**slow, "delay": 0.3, "progress": str(progress)}
    )
    looping_cfg = small_config(
        tmp_path / "wd", name="looping", model={**slow, "type": "tests.faults.KillingMLP"}
    )
    # Prefect's own race: a cancel whose process outlives the grace period is SIGKILLed,
    # reported Crashed by the worker, then Cancelled. The test plays the worker here.
    raced = server.create_run("train-pipeline/train-from-ui", ui_parameters(cancelled_cfg))
    for state in ("RUNNING", "CANCELLING", "CRASHED", "CANCELLED"):
        response = server.http.post(
            f"/flow_runs/{raced}/set_state", json={"state": {"type": state}, "force": True}
        )
        assert response.json()["status"] == "ACCEPT", response.text
    worker = server.worker()
    try:
        cancelled = server.create_run("train-pipeline/train-from-ui", ui_parameters(cancelled_cfg))
        deadline = time.time() + 180
        while forwards_so_far(progress) < 1 and time.time() < deadline:
            time.sleep(0.05)
        response = server.http.post(
            f"/flow_runs/{cancelled}/set_state",
            json={"state": {"type": "CANCELLING", "name": "Cancelling"}},
        )  # what the UI's Cancel button sends
        response.raise_for_status()
        assert server.wait_state(cancelled, TERMINAL, timeout=120) == "CANCELLED", server.run(
            cancelled
        )["state"]

        first = server.create_run("train-pipeline/train-from-ui", ui_parameters(looping_cfg))
        name = server.run(first)["name"]
        refused = _wait_for_run(
            server, f"{name}-restart-{RESTART_LIMIT + 1}", {"FAILED", "CRASHED", "COMPLETED"}, 300
        )
        # The raced run's restart was created at once, but it waits for the deployment's
        # one concurrency slot like any run (and is pushed back while the slot is busy):
        # keep the worker until it has run. It is named when it starts.
        raced_name = server.run(raced)["name"]
        restart = _wait_for_run(server, f"{raced_name}-restart-1", TERMINAL, timeout=300)
    finally:
        _stop(worker)
    runs = _runs_named(server, name)
    assert sorted(runs) == [name] + [f"{name}-restart-{n}" for n in range(1, RESTART_LIMIT + 2)]
    assert [runs[n]["state"]["type"] for n in sorted(runs)[:-1]] == ["CRASHED"] * (
        RESTART_LIMIT + 1
    )
    assert refused["state"]["type"] == "FAILED"
    assert "restarted automatically 1 time in 24 h" in refused["state"]["message"]
    restarts = json.loads(
        (server.work_dir("train-pipeline/train-from-ui") / "looping/runs/restarts.json").read_text()
    )
    claimed = [name] + [f"{name}-restart-{n}" for n in range(1, RESTART_LIMIT)]
    assert [r["continues"] for r in restarts["restarts"]] == claimed
    assert restart["state"]["type"] == "CANCELLED", _history(server, restart["id"])
    assert restart["state"]["message"] == f"Not restarting {raced_name!r}: it is Cancelled now."
    # No run was ever created to continue the cancelled one (named or not yet started).
    continuing = server.http.post("/flow_runs/filter", json={}).json()
    assert not [r for r in continuing if (r["parameters"] or {}).get("restart_of") == cancelled]
