"""Permanent errors fail a run once, with their message as the run's state message;
transient ones are retried. And evaluation reports bad input in one line."""

import asyncio
import re
import time

import pytest
import torch
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from baton.checkpoint.store import CheckpointStore
from baton.flows.cli import main
from baton.flows.train import train_pipeline

from .conftest import small_config

pytestmark = pytest.mark.integration


def _runs(flow_run_id, failed_task: bool = False, timeout: float = 60):
    """The flow run and its task runs, once each task run has a final state (and, with
    ``failed_task``, once the failed one is there): task runs and their states reach the
    server as events, after the flow run's own state. Filtered by the server: an
    unfiltered read returns the first page only (200 task runs), which a session's
    harness soon holds more than."""

    async def read():
        async with get_client() as client:
            flow_run = await client.read_flow_run(flow_run_id)
            only_this = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            tasks = await client.read_task_runs(flow_run_filter=only_this)
            return flow_run, [t for t in tasks if t.flow_run_id == flow_run_id]

    deadline = time.monotonic() + timeout
    while True:
        flow_run, tasks = asyncio.run(read())
        final = all(t.state and t.state.is_final() for t in tasks)
        seen = not failed_task or any(t.state and t.state.is_failed() for t in tasks)
        if (final and seen) or time.monotonic() > deadline:
            return flow_run, tasks
        time.sleep(0.2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim_wrapper.optimizer.lr=fast"], "optim_wrapper.optimizer.lr"),
        (["model.type=torch.utils.collect_env.run"], "not an nn.Module subclass"),
        (["resume=/dev/zero"], "outside the experiment folder"),
    ],
)
def test_a_bad_config_fails_once(prefect_harness, tmp_path, overrides, message):
    cfg = small_config(tmp_path / "wd", name="bad")
    state = train_pipeline(config=cfg, overrides=overrides, return_state=True)
    assert state.is_failed()
    assert message in state.message
    flow_run, task_runs = _runs(state.state_details.flow_run_id, failed_task=True)
    assert flow_run.run_count == 1, "a permanent error was retried by the flow"
    assert len(task_runs) == 1 and task_runs[0].name.startswith("validate-config")
    assert task_runs[0].run_count == 1
    assert not (tmp_path / "wd").exists()


def test_a_held_lock_fails_once(prefect_harness, tmp_path):
    cfg = small_config(tmp_path / "wd", name="locked")
    store = CheckpointStore(tmp_path / "wd" / "locked")
    with store.lock():
        state = train_pipeline(config=cfg, return_state=True)
    assert state.is_failed() and "lock" in state.message.lower()
    flow_run, _ = _runs(state.state_details.flow_run_id)
    assert flow_run.run_count == 1


def test_a_transient_failure_is_still_retried(prefect_harness, tmp_path):
    model = {
        "type": "tests.faults.FlakyMLP",
        "in_features": 8,
        "num_classes": 3,
        "hidden": [16],
        "fail_at": 3,
        "failures": 3,  # exhausts the task's retries: the flow's retry takes over
        "budget": str(tmp_path / "budget"),
    }
    cfg = small_config(tmp_path / "wd", name="transient", model=model)
    state = train_pipeline(config=cfg, return_state=True)
    assert state.is_completed()
    flow_run, _ = _runs(state.state_details.flow_run_id)
    assert flow_run.run_count == 2


def _one_line(err: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err


def test_evaluate_reports_bad_input_in_one_line(tmp_path, capsys):
    cfg = small_config(tmp_path / "wd", name="evaluated")
    no_val = {k: v for k, v in cfg.items() if k != "val_data"}
    no_val["checkpoint"] = {**no_val["checkpoint"], "best_metric": None}
    checkpoints = tmp_path / "wd" / "evaluated" / "checkpoints"
    checkpoints.mkdir(parents=True)
    text = checkpoints / "notes.pth"
    text.write_text("just some text\n")
    torch.save({"state_dict": {}}, checkpoints / "real.pth")
    with_val = tmp_path / "with_val.yaml"
    with_val.write_text(yaml.safe_dump(cfg))
    without_val = tmp_path / "without_val.yaml"
    without_val.write_text(yaml.safe_dump(no_val))

    assert main(["evaluate", str(checkpoints / "real.pth"), "--config", str(without_val)]) == 2
    err = capsys.readouterr().err
    _one_line(err)
    assert "no val_data" in err
    for bad, expected in (
        (text, "not a torch checkpoint"),
        (checkpoints, "is a folder"),
        (checkpoints / "missing.pth", "does not exist"),
        ("/dev/zero", "not a regular file|outside"),
    ):
        assert main(["evaluate", str(bad), "--config", str(with_val)]) in (1, 2)
        err = capsys.readouterr().err
        _one_line(err)
        assert re.search(expected, err), err


def test_a_moved_experiment_fails_once_and_resumes_where_it_is_now(prefect_harness, tmp_path):
    old, new = tmp_path / "wd" / "moving", tmp_path / "elsewhere" / "moving"
    model = {
        "type": "tests.faults.MovingMLP",
        "in_features": 8,
        "num_classes": 3,
        "hidden": [16],
        "move_at": 12,  # inside epoch 2, after epoch 1 was committed
        "folder": str(old),
        "to": str(new),
        "done": str(tmp_path / "moved"),
    }
    cfg = small_config(tmp_path / "wd", name="moving", model=model)
    state = train_pipeline(config=cfg, return_state=True)
    assert state.is_failed() and f"moved to '{new}'" in state.message
    flow_run, task_runs = _runs(state.state_details.flow_run_id, failed_task=True)
    assert flow_run.run_count == 1, "the flow retried at the old path"
    failed = [t for t in task_runs if t.state.is_failed()]
    assert [(t.name, t.run_count) for t in failed] == [("save-checkpoint-epoch-2", 1)]
    assert not old.exists(), "the run wrote a second half at the old path"

    moved = train_pipeline(config={**cfg, "work_dir": str(new.parent)}, return_state=True)
    assert moved.is_completed() and not old.exists()
    assert CheckpointStore(new).latest().epoch == cfg["train"]["max_epochs"]
