"""Real kills of real processes: SIGKILL mid-epoch, mid-checkpoint-write, after iteration
checkpoints, and SIGTERM (cancel). A new run resumes and ends bitwise equal."""

import signal
import time
from pathlib import Path

import pytest

from baton import CheckpointStore
from baton.config import validate
from baton.run import pipeline as pl

from ..faults import forwards_so_far
from .conftest import small_config
from .helpers import (
    assert_same_training_result,
    final_checkpoint,
    finish,
    kill_mid_checkpoint_write,
    run_env,
    start,
    stop_group,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
EPOCH_LENGTH = 16  # 512 samples / 32


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory):
    return run_env(tmp_path_factory.mktemp("prefect_home"))


def config(tmp_path, name, model, **overrides):
    base = {"train_data.dataset.num_samples": 512, **overrides}
    return small_config(tmp_path / name, model=model, **base)


def slow_model(delay=0.02, hidden=(16,)):
    return {
        "type": "tests.faults.SlowMLP",
        "in_features": 8,
        "num_classes": 3,
        "hidden": list(hidden),
        "dropout": 0.2,
        "delay": delay,
    }


def committed(cfg):
    store = CheckpointStore(Path(cfg["work_dir"]) / cfg["experiment_name"])

    def check():
        try:
            return store.list()
        except Exception:
            return []

    return check


def reference(tmp_path, model, **overrides):
    cfg = config(tmp_path, "reference", model, **overrides)
    pl.run(validate(cfg))
    return final_checkpoint(cfg)


def test_sigkill_mid_epoch(tmp_path, prefect_env):
    model = slow_model()
    cfg = config(tmp_path, "killed", model)
    process = start(cfg, prefect_env, tmp_path)
    try:
        assert wait_for(lambda: any(r.epoch >= 1 for r in committed(cfg)()), process)
        time.sleep(0.15)  # into epoch 2
    finally:
        stop_group(process)
    assert max(r.epoch for r in committed(cfg)()) < 4
    output = finish(cfg, prefect_env, tmp_path)
    assert "resuming" in output
    assert_same_training_result(reference(tmp_path, model), final_checkpoint(cfg))


def test_sigkill_mid_checkpoint_write(tmp_path, prefect_env):
    model = slow_model(delay=0.0, hidden=(2048, 2048))  # ~36 MB of weights and momentum
    cfg = config(tmp_path, "killed-write", model, **{"train.max_epochs": 3})
    kill_mid_checkpoint_write(cfg, prefect_env, tmp_path)
    finish(cfg, prefect_env, tmp_path)
    assert_same_training_result(
        reference(tmp_path, model, **{"train.max_epochs": 3}), final_checkpoint(cfg)
    )


def test_sigkill_after_iteration_checkpoint_resumes_mid_epoch(tmp_path, prefect_env):
    model = slow_model()
    overrides = {"checkpoint.interval_iters": 4}
    cfg = config(tmp_path, "killed-iter", model, **overrides)
    mid_epoch = EPOCH_LENGTH + 8
    process = start(cfg, prefect_env, tmp_path)
    try:
        assert wait_for(lambda: any(r.iter >= mid_epoch for r in committed(cfg)()), process)
    finally:
        stop_group(process)
    latest = CheckpointStore(Path(cfg["work_dir"]) / cfg["experiment_name"]).latest()
    assert latest.iter % EPOCH_LENGTH != 0, "the kill should leave an iteration checkpoint newest"
    output = finish(cfg, prefect_env, tmp_path)
    assert f"iter {latest.iter}" in output
    assert_same_training_result(reference(tmp_path, model, **overrides), final_checkpoint(cfg))


def test_sigterm_saves_an_emergency_checkpoint(tmp_path, prefect_env):
    progress = tmp_path / "forwards"
    model = {**slow_model(), "progress": str(progress)}
    cfg = config(tmp_path, "terminated", model)
    process = start(cfg, prefect_env, tmp_path)
    try:
        # well inside epoch 2: the signal arrives while the training task runs
        assert wait_for(lambda: forwards_so_far(progress) >= EPOCH_LENGTH + 5, process)
        sent = time.time()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        assert time.time() - sent < 30
    finally:
        stop_group(process)
    refs = committed(cfg)()
    emergency = [r for r in refs if r.iter % EPOCH_LENGTH != 0]
    output = process.stdout.read().decode(errors="replace")
    assert emergency, f"no emergency checkpoint among {[r.uri for r in refs]}:\n{output[-4000:]}"
    assert "emergency checkpoint" in output
    assert finish(cfg, prefect_env, tmp_path).count("resuming") >= 1
    assert_same_training_result(reference(tmp_path, model), final_checkpoint(cfg))
