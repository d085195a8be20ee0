"""When the orchestrator fails too: a worker killed alone, a server stopped mid-run, a
cancel sent right after. A real server (stopped and started again on the same database),
real workers, deployments/automations.yaml, timers shortened through settings.
"""

import contextlib
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from baton.config import validate
from baton.run import pipeline as pl
from baton.tasks._common import artifact_key

from ..faults import forwards_so_far
from ..flows.conftest import small_config
from ..flows.helpers import assert_same_training_result, final_checkpoint
from .test_restart import (
    _flow_run_processes,
    _history,
    _seconds,
    _wait_for_run,
    automated_server,
)
from .test_server import TERMINAL, Server, _stop, ui_parameters

pytestmark = [pytest.mark.integration, pytest.mark.slow]
UI = "train-pipeline/train-from-ui"
NIGHTLY = "train-pipeline/nightly-digits-mlp"
OUTAGE_S = 60  # the server is down this long: more than the Silent window (40 s here)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect_home")
    with automated_server(home, BATON_WATCH_INTERVAL_S="1") as instance:
        # The nightly deployment serves as a second deployment here: no 03:00 run of its own.
        nightly = instance.deployment(NIGHTLY)
        for schedule in nightly["schedules"]:
            instance.http.delete(
                f"/deployments/{nightly['id']}/schedules/{schedule['id']}"
            ).raise_for_status()
        yield instance


def _slow(progress: Path, delay: float) -> dict:
    return {
        "type": "tests.faults.SlowMLP",
        "in_features": 8,
        "num_classes": 3,
        "hidden": [16],
        "delay": delay,
        "progress": str(progress),
    }


def _wait_forwards(
    server: Server, run_id: str, progress: Path, at_least: int, timeout: float = 180
) -> int:
    deadline = time.time() + timeout
    while forwards_so_far(progress) < at_least and time.time() < deadline:
        time.sleep(0.05)
    done = forwards_so_far(progress)
    assert done >= at_least, (done, _history(server, run_id), _logs(server, run_id)[-20:])
    return done


def _wait_gone(pids: list[int], timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not [p for p in pids if Path(f"/proc/{p}").exists()]:
            return
        time.sleep(0.1)
    raise AssertionError(f"flow-run processes {pids} outlived their run")


def _ended(server: Server, run_id: str, timeout: float) -> str:
    """The run's terminal state, or a failure that shows its history and last log lines."""
    try:
        return server.wait_state(run_id, TERMINAL, timeout=timeout)
    except AssertionError as err:
        raise AssertionError(
            f"{err}\n" + "\n".join(_history(server, run_id) + _logs(server, run_id)[-30:])
        ) from None


def _task_runs(server: Server, run_id: str) -> dict[str, str]:
    response = server.http.post(
        "/task_runs/filter",
        json={"flow_runs": {"id": {"any_": [run_id]}}, "limit": 200},
    )
    response.raise_for_status()
    return {t["name"]: t["state"]["type"] for t in response.json()}


def _restarts_of(server: Server, run_id: str) -> list[dict]:
    runs = server.http.post("/flow_runs/filter", json={"limit": 200}).json()
    return [r for r in runs if (r["parameters"] or {}).get("restart_of") == run_id]


def _set_state(server: Server, run_id: str, state: dict, force: bool = False) -> None:
    response = server.http.post(
        f"/flow_runs/{run_id}/set_state", json={"state": state, "force": force}
    )
    assert response.json()["status"] == "ACCEPT", response.text


def _wait_named(server: Server, run_id: str, name: str, after: str, timeout: float = 60) -> None:
    """Wait until a state called ``name`` follows the newest one called ``after``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        names = [s["name"] for s in _states(server, run_id)]
        if after in names and name in names[len(names) - names[::-1].index(after) :]:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {name} after {after}: {_history(server, run_id)}")


def _wait_restarts_ended(server: Server, run_id: str, timeout: float = 240) -> list[dict]:
    """The restarts of ``run_id`` once one exists and every one has ended."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        restarts = _restarts_of(server, run_id)
        if restarts and all(r["state"]["type"] in TERMINAL for r in restarts):
            return restarts
        time.sleep(0.5)
    raise AssertionError([_history(server, r["id"]) for r in _restarts_of(server, run_id)])


def _states(server: Server, run_id: str) -> list[dict]:
    states = server.http.get("/flow_run_states/", params={"flow_run_id": run_id}).json()
    return sorted(states, key=lambda s: s["timestamp"])


def _state_types(server: Server, run_id: str) -> list[str]:
    return [s["type"] for s in _states(server, run_id)]


def _corrected(server: Server, run_id: str) -> float:
    """Seconds from the run's first Silent mark to the Running state after it."""
    states = _states(server, run_id)
    first = next(i for i, s in enumerate(states) if s["name"] == "Silent")
    back = next(s for s in states[first:] if s["name"] == "Running")
    return _seconds(states[first]["timestamp"], back["timestamp"])


def _logs(server: Server, run_id: str) -> list[str]:
    response = server.http.post(
        "/logs/filter", json={"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200}
    )
    return [f"{line['level']} {line['message']}" for line in response.json()]


def _slow_run(server: Server, tmp_path: Path, name: str) -> tuple[str, Path, dict]:
    """A run of the UI deployment that trains 4 epochs of 8 slow iterations (0.2 s)."""
    progress = tmp_path / "forwards"
    cfg = small_config(tmp_path / "wd", name=name, model=_slow(progress, delay=0.2))
    return server.create_run(UI, ui_parameters(cfg)), progress, cfg


def _assert_like_uninterrupted(server: Server, tmp_path: Path, cfg: dict) -> None:
    """The deployed experiment ends bitwise equal to an uninterrupted run of its config."""
    model = {**cfg["model"], "progress": None}
    reference = small_config(tmp_path / "ref", name=cfg["experiment_name"], model=model)
    pl.run(validate(reference))
    deployed = {**cfg, "work_dir": str(server.work_dir(UI))}
    assert_same_training_result(final_checkpoint(reference), final_checkpoint(deployed))


def test_a_killed_worker_costs_at_most_the_current_iteration(server, tmp_path):
    first, progress, cfg = _slow_run(server, tmp_path, "orphaned")
    worker = server.worker()
    try:
        killed_at = _wait_forwards(server, first, progress, 8 + 4)  # inside epoch 2
        pids = _flow_run_processes(first)
        assert pids, "could not find the flow run's process"
    finally:
        _stop(worker)  # SIGKILL of the worker alone: the flow process has a session of its own
    killed = time.time()
    assert server.wait_state(first, TERMINAL, timeout=120) == "CRASHED", _history(server, first)
    crashed_after = time.time() - killed
    _wait_gone(pids)
    message = server.run(first)["state"]["message"]
    stopped = re.search(r"emergency checkpoint (iter_(\d+)\.pth) committed", message)
    assert message.startswith("Its worker died; stopped at iteration"), message
    assert stopped and int(stopped[2]) >= killed_at, message
    # no ERROR line, no traceback: a worker's death is an expected stop
    assert not [line for line in _logs(server, first) if line.startswith("40 ")], _logs(
        server, first
    )
    # The stopped run created its restart itself: named from the start, and only one.
    name = server.run(first)["name"]
    assert server.run(first)["state"]["name"] == "Interrupted"
    (waiting,) = _restarts_of(server, first)
    assert waiting["name"] == f"{name}-restart-1" and waiting["state"]["type"] == "SCHEDULED"
    assert message.endswith(f"{name}-restart-1 continues it from there."), message

    worker = server.worker()  # a worker comes back: the restart continues the run
    try:
        restarted = _wait_for_run(server, f"{name}-restart-1", TERMINAL, timeout=240)
    finally:
        _stop(worker)
    assert restarted["state"]["type"] == "COMPLETED", _history(server, restarted["id"])
    assert [r["id"] for r in _restarts_of(server, first)] == [restarted["id"]]
    print(
        f"\nworker SIGKILLed at iteration {killed_at}: run stopped at iteration {int(stopped[2])} "
        f"and ended Interrupted {crashed_after:.1f} s after the kill (polled); restart "
        f"completed {_seconds(restarted['created'], restarted['end_time']):.0f} s after it "
        "was created (its worker started once the run had ended)"
    )
    resumed = [line for line in _logs(server, restarted["id"]) if stopped[1] in line]
    assert resumed, "the restart did not resume from the emergency checkpoint"
    _assert_like_uninterrupted(server, tmp_path, cfg)


def test_a_server_outage_changes_nothing_and_a_cancel_after_it_is_honoured(server, tmp_path):
    """Two runs train while the server is down for OUTAGE_S: one completes with its whole
    record and no false Crashed; the other is cancelled as soon as the server is back."""
    kept_progress, cancelled_progress = tmp_path / "kept", tmp_path / "cancelled"
    kept_cfg = small_config(
        tmp_path / "wd",
        name="outlived",
        model=_slow(kept_progress, delay=0.2),
        **{"train.max_epochs": 40},
    )
    cancelled_cfg = small_config(
        tmp_path / "wd",
        name="cancelled-after",
        model=_slow(cancelled_progress, delay=0.05),
        **{"train.max_epochs": 400},
    )
    kept = server.create_run(UI, ui_parameters(kept_cfg))
    cancelled = server.create_run(NIGHTLY, ui_parameters(cancelled_cfg))
    worker = server.worker()
    try:
        _wait_forwards(server, kept, kept_progress, 16)
        _wait_forwards(server, cancelled, cancelled_progress, 16)
        server.down()
        down_at = forwards_so_far(kept_progress)
        time.sleep(OUTAGE_S)  # the outage itself: training goes on meanwhile
        assert forwards_so_far(kept_progress) > down_at, "training stopped with the server"
        server.up()
        # The run's concurrency slot outlived the restart: Prefect's next renewal holds it.
        lease = server.run(kept)["state"]["state_details"]["deployment_concurrency_lease_id"]
        renewed = server.http.post(
            f"/v2/concurrency_limits/leases/{lease}/renew", json={"lease_duration": 300}
        )
        assert renewed.status_code == 204, renewed.text
        # Whatever the automations did at the server's return, a Silent mark is undone.
        _set_state(server, kept, {"type": "RUNNING", "name": "Silent", "message": "by hand"})
        _wait_named(server, kept, "Running", after="Silent")
        at_cancel = forwards_so_far(cancelled_progress)
        response = server.http.post(
            f"/flow_runs/{cancelled}/set_state",
            json={"state": {"type": "CANCELLING", "name": "Cancelling"}},
        )  # what the UI's Cancel button sends
        response.raise_for_status()
        assert _ended(server, cancelled, 120) == "CANCELLED", _history(server, cancelled)
        assert server.wait_state(kept, TERMINAL, timeout=300) == "COMPLETED", _history(server, kept)
        # The cancelled run's deployment slot is free: the next run of it starts and ends.
        after = server.create_run(
            NIGHTLY, ui_parameters(small_config(tmp_path / "wd", name="after-the-cancel"))
        )
        assert server.wait_state(after, TERMINAL, timeout=240) == "COMPLETED"
    finally:
        _stop(worker)

    # The completed run: no false Crashed, no restart, every epoch's task runs recorded.
    assert "CRASHED" not in _state_types(server, kept), _history(server, kept)
    assert not _restarts_of(server, kept)
    tasks = _task_runs(server, kept)
    for epoch in range(1, 41):
        assert tasks.get(f"train-epoch-{epoch}") == "COMPLETED", (epoch, tasks)
    deployed = {**kept_cfg, "work_dir": str(server.work_dir(UI))}
    assert final_checkpoint(deployed)["meta"]["epoch"] == 40
    # What the server lost was sent again, the artifacts published, with no failure.
    failures = ("40 ", "30 could not send again", "30 gave up publishing")
    for run_id in (kept, cancelled):
        assert not [line for line in _logs(server, run_id) if line.startswith(failures)]
    table = server.artifacts(kept)[artifact_key("outlived", "metrics")]["data"]
    rows = json.loads(table) if isinstance(table, str) else table
    assert [row["epoch"] for row in rows] == list(range(1, 41))

    # The cancelled one: its position committed, one line that says so, nothing restarted.
    message = server.run(cancelled)["state"]["message"]
    stopped = re.search(
        r"Cancelled at iteration (\d+)/(\d+) .*checkpoint (\w+)_(\d+)\.pth", message
    )
    assert stopped and at_cancel <= int(stopped[1]) < int(stopped[2]), "\n".join(
        [message, *_history(server, cancelled), *_logs(server, cancelled)[-30:]]
    )
    held = int(stopped[4]) * (8 if stopped[3] == "epoch" else 1)
    assert held == int(stopped[1]), message  # the checkpoint holds where it stopped
    experiment = server.work_dir(NIGHTLY) / "cancelled-after"
    assert (experiment / "checkpoints" / f"{stopped[3]}_{stopped[4]}.pth").exists()
    assert not _restarts_of(server, cancelled)
    assert "CRASHED" not in _state_types(server, cancelled), _history(server, cancelled)
    assert not [line for line in _logs(server, cancelled) if line.startswith("40 ")]
    states = {s["name"]: s["timestamp"] for s in _states(server, cancelled)}
    silent = [s for s in _states(server, kept) if s["name"] == "Silent"]
    print(
        f"\ncancel after a {OUTAGE_S} s outage: sent at iteration {at_cancel}, stopped at "
        f"{stopped[1]}, Cancelling -> Cancelled "
        f"{_seconds(states['Cancelling'], states['Cancelled']):.1f} s; the live run was "
        + (
            f"marked Silent and set Running again {_corrected(server, kept):.1f} s later"
            if silent
            else "never marked Silent"
        )
    )
    with contextlib.suppress(ProcessLookupError):
        for pid in _flow_run_processes(kept) + _flow_run_processes(cancelled):
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"flow-run process {pid} outlived its run")


def test_a_live_run_marked_crashed_stops_with_a_checkpoint_and_its_restart_continues(
    server, tmp_path
):
    """A live run marked Crashed (as a misfiring automation would): the mark revoked its
    concurrency slot, and Prefect would end the run mid-iteration at its next renewal. It
    stops first, with an emergency checkpoint, and the automation's restart completes it."""
    first, progress, cfg = _slow_run(server, tmp_path, "marked-crashed")
    worker = server.worker()
    try:
        _wait_forwards(server, first, progress, 8 + 4)
        _set_state(server, first, {"type": "CRASHED", "message": "marked by hand"}, force=True)
        _wait_gone(_flow_run_processes(first) or [0])
        assert server.run(first)["state"]["message"] == "marked by hand"
        # The run's own restart and the automation's (unless the live run cancelled it
        # before it started): one continues the run, the other ends Cancelled.
        restarts = _wait_restarts_ended(server, first)
    finally:
        _stop(worker)
    ended = sorted(r["state"]["type"] for r in restarts)
    assert ended.count("COMPLETED") == 1, [_history(server, r["id"]) for r in restarts]
    # The other restart, when there is one, trains nothing: it ends Cancelled (it gives
    # way), or, in one CI run of five, Crashed (cause not found yet, see the issue's
    # closing note); either way the experiment ends as an uninterrupted run would.
    assert set(ended) <= {"COMPLETED", "CANCELLED", "CRASHED"}, ended
    _assert_like_uninterrupted(server, tmp_path, cfg)
