"""Contract 6: each task works in a fresh process from its (small, serialisable) inputs alone."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from baton.config import validate
from baton.run import pipeline as pl

from .conftest import small_config
from .helpers import assert_same_training_result, final_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]

RUNNER = """
import json, sys
from baton import tasks
from baton.checkpoint.ref import CheckpointRef
from baton.run.control import ResumePlan
name, payload = sys.argv[1], json.loads(sys.stdin.read())
task = getattr(tasks, name)
args = payload["args"]
if "state" in payload:
    args["state"] = tasks.RunState.model_validate(payload["state"])
if payload.get("checkpoint") is not None:
    args["checkpoint"] = CheckpointRef.model_validate(payload["checkpoint"])
if isinstance(args.get("checkpoint"), dict):  # a plan, as Prefect would validate it
    args["checkpoint"] = ResumePlan.model_validate(args["checkpoint"])
result = task.fn(**args)
print("RESULT" + json.dumps(result.model_dump(mode="json") if hasattr(result, "model_dump") else result))
"""


def call(name, env, **payload):
    out = subprocess.run(
        [sys.executable, "-c", RUNNER, name],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT") :])


def test_every_task_in_its_own_process(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    }
    cfg = call(
        "validate_config",
        env,
        args={"config": small_config(tmp_path / "wd", **{"train.max_epochs": 2})},
    )
    plan = call("find_resume_point", env, args={"config": cfg})
    assert plan == {"checkpoint": None, "lineage": None}
    # the plan travels to prepare, which records it once the pipeline is built
    state = call("prepare", env, args={"config": cfg, "checkpoint": plan})
    for epoch in (1, 2):
        state = call("train_epoch", env, args={"config": cfg, "epoch": epoch}, state=state)
        state = call("evaluate", env, args={"config": cfg, "epoch": epoch}, state=state)
        state = call("save_checkpoint", env, args={"config": cfg, "epoch": epoch}, state=state)
    assert state["epoch"] == 2 and state["checkpoint"]["epoch"] == 2
    assert "val/accuracy" in state["metrics"]

    reference_cfg = small_config(tmp_path / "ref", **{"train.max_epochs": 2})
    pl.run(validate(reference_cfg))
    assert_same_training_result(final_checkpoint(reference_cfg), final_checkpoint(cfg))
