"""The training flow on two processes: every step a task in the UI, and the kills and
stops of issue 24 (the flow's process SIGKILLed, a rank SIGKILLed, a SIGTERM), after each
of which the run ends bitwise equal to an uninterrupted one and no process is left."""

import asyncio
import os
import re
import signal
import time
from pathlib import Path

import pytest
import yaml
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from baton.checkpoint.store import CheckpointStore
from baton.flows.train import train_pipeline
from baton.run import pipeline as pl

from ..faults import forwards_so_far
from ..flows.helpers import (
    assert_same_training_result,
    finish,
    run_env,
    start,
    stop_group,
    wait_for,
)
from .helpers import MARK, config, latest, processes_marked

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EPOCH_LENGTH = 4  # 256 samples in global batches of 2 x 32


def slow(progress: Path, delay: float = 0.05) -> dict:
    return {
        "type": "tests.faults.SlowMLP",
        "in_features": 8,
        "num_classes": 3,
        "hidden": [16],
        "dropout": 0.2,
        "delay": delay,
        "progress": str(progress),
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run on two processes of the slow model (its progress file aside)."""
    folder = tmp_path_factory.mktemp("reference")
    cfg = config(folder, 2, model=slow(folder / "progress"))
    pl.run(cfg)
    return latest(cfg)


@pytest.fixture
def env(tmp_path):
    """A ``baton run`` child's environment, marked so its processes can be found."""
    environment = run_env(tmp_path / "prefect_home")
    environment[MARK] = tmp_path.name + str(time.monotonic_ns())
    yield environment
    deadline = time.time() + 30
    while processes_marked(environment[MARK]) and time.time() < deadline:
        time.sleep(0.2)
    assert processes_marked(environment[MARK]) == [], "a rank or torchrun outlived its run"


def as_dict(cfg) -> dict:
    return yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json")))


def test_every_step_of_a_two_process_run_is_a_task(prefect_harness, tmp_path):
    cfg = config(tmp_path, 2, **{"train.max_epochs": 2})
    state = train_pipeline(config=as_dict(cfg), return_state=True)
    assert state.is_completed(), state.message
    assert state.result().checkpoint.uri.endswith("epoch_0002.dcp")

    async def task_names():
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
                )
            )
        return {run.name for run in runs}

    expected = {"train-epoch-1", "train-epoch-2", "evaluate-epoch-2", "save-checkpoint-epoch-2"}
    deadline = time.monotonic() + 30  # the server records task runs from events, in batches
    while not expected <= (names := asyncio.run(task_names())) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert expected <= names, names
    assert any(name.startswith("prepare-") for name in names)
    assert any(name.startswith("find-resume-point") for name in names)


def test_flow_process_sigkilled_then_rerun_ends_bitwise_equal(tmp_path, env, reference):
    progress = tmp_path / "progress"
    cfg = as_dict(config(tmp_path / "wd", 2, model=slow(progress)))
    process = start(cfg, env, tmp_path)
    try:
        assert wait_for(lambda: forwards_so_far(progress) >= EPOCH_LENGTH + 2, process)
    finally:
        stop_group(process)  # the CLI's group: torchrun and its ranks lead their own
    deadline = time.time() + 30
    while processes_marked(env[MARK]) and time.time() < deadline:
        time.sleep(0.1)
    assert processes_marked(env[MARK]) == [], "the ranks outlived the killed flow process"
    finish(cfg, env, tmp_path)
    assert_same_training_result(reference, latest(config(tmp_path / "wd", 2, model=slow(progress))))


def test_a_sigkilled_rank_fails_the_task_and_its_retry_ends_bitwise_equal(tmp_path, env, reference):
    progress = tmp_path / "progress"
    cfg = as_dict(config(tmp_path / "wd", 2, model=slow(progress)))
    process = start(cfg, env, tmp_path)
    try:
        assert wait_for(lambda: forwards_so_far(progress) >= EPOCH_LENGTH + 2, process)
        (rank_1,) = processes_marked(env[MARK], rank=1)
        os.kill(rank_1, signal.SIGKILL)
        output, _ = process.communicate(timeout=300)
    finally:
        stop_group(process)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-3000:]
    # Which side reports the death first is a race: torchrun (the driver sees a process
    # die) or rank 0 (its collective with the dead rank fails); both fail the task.
    assert re.search(r"a training process died|rank 0 raised", text), text[-3000:]
    assert_same_training_result(reference, latest(config(tmp_path / "wd", 2, model=slow(progress))))


def test_sigterm_reaches_every_rank_and_commits_a_whole_sharded_checkpoint(
    tmp_path, env, reference
):
    progress = tmp_path / "progress"
    wd = tmp_path / "wd"
    # Slow iterations: the signal, sent at epoch 2's first iteration, must reach the ranks
    # before its last one, where they agree to stop, on a busy machine too (0.75 s here).
    model = slow(progress, delay=0.25)
    cfg = as_dict(config(wd, 2, model=model))
    process = start(cfg, env, tmp_path)
    try:
        assert wait_for(lambda: forwards_so_far(progress) >= EPOCH_LENGTH + 1, process)
        process.send_signal(signal.SIGTERM)  # the flow's process only, as a cancel does
        process.wait(timeout=60)
    finally:
        stop_group(process)
    store = CheckpointStore(wd / "ddp")
    # Named by iteration: written where the ranks agreed to stop (every 8 iterations and
    # at an epoch's last), not by an epoch's end.
    emergency = [r for r in store.list() if Path(r.uri).name.startswith("iter_")]
    output = process.stdout.read().decode(errors="replace")
    assert emergency, output[-3000:]
    assert "emergency checkpoint" in output
    assert Path(emergency[-1].uri).suffix == ".dcp"
    store.verify(emergency[-1])  # every rank's part, DCP's metadata, baton.pt
    finish(cfg, env, tmp_path)
    assert_same_training_result(reference, latest(config(wd, 2, model=model)))
