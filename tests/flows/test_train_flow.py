"""The training flow on real Prefect: completes, publishes artifacts, restarts exactly."""

import json

import pytest
from prefect.client.orchestration import get_client

from baton.checkpoint.store import CheckpointStore
from baton.config import validate
from baton.flows.train import train_pipeline
from baton.run import pipeline as pl
from baton.tasks._common import artifact_key

from ..baton.helpers import HALVING_PLATEAU
from .conftest import small_config
from .helpers import assert_same_training_result, final_checkpoint, flaky

pytestmark = pytest.mark.integration


def reference(tmp_path, model):
    """The uninterrupted run: same config, its failure budget already spent."""
    (tmp_path / "spent").write_text("99")
    model = {**model, "budget": str(tmp_path / "spent")}
    cfg = small_config(tmp_path / "reference", model=model)
    pl.run(validate(cfg))
    return final_checkpoint(cfg)


def test_flow_completes_with_checkpoints_metrics_and_artifacts(prefect_harness, tmp_path):
    cfg = small_config(tmp_path / "wd", name="artifact-check", **{"train.log_interval": 4})
    state = train_pipeline(config=cfg, return_state=True)
    assert state.is_completed()
    result = state.result()
    assert (result.epoch, result.iter) == (4, 32)
    experiment = tmp_path / "wd" / "artifact-check"
    assert sorted(p.name for p in (experiment / "checkpoints").iterdir()) == [
        f"epoch_000{e}.pth" for e in (1, 2, 3, 4)
    ]
    records = [json.loads(line) for line in (experiment / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]
    assert {"train/loss", "val/accuracy"} <= set(epochs[-1])
    assert [r["iter"] for r in records if r["kind"] == "iteration"] == list(range(4, 33, 4))
    run_logs = "".join(p.read_text() for p in (experiment / "runs").rglob("*.log"))
    assert "train-epoch-4" in run_logs and "saved checkpoint" in run_logs

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts()

    import asyncio

    found = asyncio.run(artifacts())
    keys = {a.key for a in found if a.key}
    assert {artifact_key("artifact-check", s) for s in ("checkpoint", "metrics", "summary")} <= keys
    newest_link = max(
        (a for a in found if a.key == artifact_key("artifact-check", "checkpoint")),
        key=lambda a: a.created,
    )
    assert "epoch_0004.pth" in newest_link.data
    # TensorBoard: one event file for the run, every epoch's scalars in it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_files = list((experiment / "tensorboard").glob("events.out.tfevents.*"))
    assert len(event_files) == 1
    events = EventAccumulator(str(event_files[0]))
    events.Reload()
    assert [e.step for e in events.Scalars("val/accuracy")] == [8, 16, 24, 32]
    # a plain run of the same config ends at the same weights: the flow adds no randomness
    plain_cfg = small_config(tmp_path / "plain", name="artifact-check", **{"train.log_interval": 4})
    pl.run(validate(plain_cfg))
    assert_same_training_result(final_checkpoint(plain_cfg), final_checkpoint(cfg))


def test_rerun_of_a_finished_experiment_is_a_no_op(prefect_harness, tmp_path):
    cfg = small_config(tmp_path / "wd", name="done", **{"train.max_epochs": 2})
    train_pipeline(config=cfg)
    before = final_checkpoint(cfg)
    state = train_pipeline(config=cfg, return_state=True)
    assert state.is_completed() and state.result().epoch == 2
    assert_same_training_result(before, final_checkpoint(cfg))
    # a longer horizon continues
    longer = train_pipeline(config=cfg, overrides=["train.max_epochs=3"], return_state=True)
    assert longer.result().epoch == 3


def test_task_retry_resumes_exactly(prefect_harness, tmp_path):
    model = flaky(tmp_path, failures=1)
    cfg = small_config(tmp_path / "wd", model=model)
    state = train_pipeline(config=cfg, return_state=True)
    assert state.is_completed()
    assert (tmp_path / "budget").read_text() == "1"
    assert_same_training_result(reference(tmp_path, model), final_checkpoint(cfg))


def test_flow_retry_resumes_exactly(prefect_harness, tmp_path):
    model = flaky(tmp_path, failures=3)  # more than the task's two retries
    cfg = small_config(tmp_path / "wd", model=model)
    state = train_pipeline(config=cfg, return_state=True)
    assert state.is_completed()
    assert (tmp_path / "budget").read_text() == "3"
    assert_same_training_result(reference(tmp_path, model), final_checkpoint(cfg))


def test_new_flow_run_after_a_failed_one_resumes_exactly(prefect_harness, tmp_path):
    model = flaky(tmp_path, failures=6)  # exhausts task retries in both flow attempts
    cfg = small_config(tmp_path / "wd", model=model)
    failed = train_pipeline(config=cfg, return_state=True)
    assert failed.is_failed()
    assert final_checkpoint(cfg)["meta"]["epoch"] == 1
    state = train_pipeline(config=cfg, return_state=True)
    assert state.is_completed()
    assert_same_training_result(reference(tmp_path, model), final_checkpoint(cfg))


def test_bad_config_fails_before_any_work(prefect_harness, tmp_path):
    cfg = small_config(tmp_path / "wd", name="bad")
    cfg["train"]["max_epochs"] = 0
    state = train_pipeline(config=cfg, return_state=True)
    assert state.is_failed()
    assert "train.max_epochs" in str(state.message) or "train.max_epochs" in repr(
        state.result(raise_on_failure=False)
    )
    assert not (tmp_path / "wd").exists()


def test_a_second_run_of_a_busy_experiment_fails_clearly(prefect_harness, tmp_path):
    from baton import CheckpointStore, ExperimentLockedError

    cfg = small_config(tmp_path / "wd", name="busy")
    with CheckpointStore(tmp_path / "wd" / "busy").lock():
        state = train_pipeline(config=cfg, return_state=True)
    assert state.is_failed()
    with pytest.raises(ExperimentLockedError, match="is being trained by pid"):
        state.result()
    assert not (tmp_path / "wd" / "busy" / "checkpoints").exists()


# The learning rate halves after every validation but the first: a skipped one shows.
PLATEAU = {"checkpoint.interval": 2, "param_scheduler": [HALVING_PLATEAU]}


def test_task_retry_replays_the_validations_a_plateau_scheduler_follows(prefect_harness, tmp_path):
    # Fails inside epoch 2 with no checkpoint yet: the retry replays epoch 1 from scratch,
    # and must replay its validation too.
    model = flaky(tmp_path, failures=1)
    cfg = small_config(tmp_path / "wd", model=model, **PLATEAU)
    state = train_pipeline(config=cfg, return_state=True)
    assert state.is_completed()
    assert (tmp_path / "budget").read_text() == "1"
    (tmp_path / "spent").write_text("99")
    spent = {**model, "budget": str(tmp_path / "spent")}
    reference_cfg = small_config(tmp_path / "reference", model=spent, **PLATEAU)
    pl.run(validate(reference_cfg))
    result = final_checkpoint(cfg)
    # the validations after epochs 1-3 count; the last one is at end (max_epochs), outside
    # the scheduler's range as in mmengine. Without epoch 1 replayed, this is 1.
    assert result["param_schedulers"][0]["last_step"] == 2
    assert_same_training_result(final_checkpoint(reference_cfg), result)


def test_background_saves_in_the_flow_end_equal_to_foreground_saves(prefect_harness, tmp_path):
    # the flow's save task writes in the background before the horizon (run control's
    # plan) and in the foreground at it; the run ends where a foreground-only run does
    background = small_config(tmp_path / "bg", **{"checkpoint.async_save": True})
    state = train_pipeline(config=background, return_state=True)
    assert state.is_completed()
    result = state.result()
    assert result.checkpoint is not None and result.checkpoint.epoch == 4
    assert result.checkpoint == pl.find_resume_point(validate(background))
    foreground = small_config(tmp_path / "fg")
    pl.run(validate(foreground))
    assert_same_training_result(final_checkpoint(background), final_checkpoint(foreground))


def test_a_task_retry_never_loses_a_committed_checkpoint(prefect_harness, tmp_path, monkeypatch):
    # Iteration checkpoints at every iteration, the last two kept; the model fails once at
    # iteration 13 (inside epoch 2), after iteration checkpoints 9-12 were committed.
    settings = {"checkpoint.interval_iters": 1, "checkpoint.keep_last": 2}
    model = flaky(tmp_path, failures=1)
    cfg = small_config(tmp_path / "wd", model=model, **settings)
    committed: list = []  # every commit the run reported, in order
    original = CheckpointStore.commit

    def commit(store, uri, **kwargs):
        ref = original(store, uri, **kwargs)
        committed.append(ref)
        kept = {(r.uri, r.sha256): r for lin in store.lineages() for r in lin.checkpoints}
        position = {(r.epoch, r.iter) for r in kept.values()}
        for earlier in committed:
            if (earlier.uri, earlier.sha256) in kept:
                continue
            # Gone: only as retention's keep_last (2) displaced it by newer positions.
            newer = [p for p in position if p > (earlier.epoch, earlier.iter)]
            assert len(newer) >= 2, f"{earlier.uri} vanished; kept {sorted(position)}"
        assert max((r.epoch, r.iter) for r in committed) in position  # the newest stays
        return ref

    monkeypatch.setattr(CheckpointStore, "commit", commit)
    # The run trains in this process, where the commits are watched (a forked training
    # process would record them in its own copy of `committed`).
    monkeypatch.setattr(pl, "fork_refused", lambda: "the test watches commits here")
    state = train_pipeline(config=cfg, return_state=True)
    assert state.is_completed()
    assert (tmp_path / "budget").read_text() == "1"
    positions = [(r.epoch, r.iter) for r in committed]
    # A replay never commits again what was committed: every position once, in order.
    assert positions == sorted(set(positions))
    assert (1, 12) in positions  # committed before the failure
    store = CheckpointStore(f"{cfg['work_dir']}/{cfg['experiment_name']}")
    assert [r.iter for r in store.list()] == [31, 32]  # the newest by position
    monkeypatch.undo()
    (tmp_path / "spent").write_text("99")
    plain = small_config(
        tmp_path / "reference", model={**model, "budget": str(tmp_path / "spent")}, **settings
    )
    pl.run(validate(plain))
    assert_same_training_result(final_checkpoint(plain), final_checkpoint(cfg))
