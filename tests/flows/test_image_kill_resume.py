"""Real kills on an image folder with random augmentation read by loader workers: SIGKILL
mid-epoch (0, 2 and 3 workers) and mid-checkpoint-write, and a worker that dies. Each run
ends bitwise equal to an uninterrupted one."""

from pathlib import Path

import pytest

from baton import CheckpointStore
from baton.config import validate
from baton.run import pipeline as pl

from ..baton.image_folders import augmentation, make_image_folder
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

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning"),
]
EPOCH_LENGTH = 8  # 3 classes x 16 images / 6


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory):
    return run_env(tmp_path_factory.mktemp("prefect_home"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images") / "train", per_class=16)


def image_config(tmp_path, name, images, model, workers, dataset=None, **overrides):
    folder = {"type": "ImageFolder", "root": str(images), "mode": "L"}
    data = {
        "train_data": {
            "dataset": {**folder, "transform": augmentation(size=12), **(dataset or {})},
            "batch_size": 6,
            "num_workers": workers,
        },
        "val_data": {"dataset": folder, "batch_size": 16, "shuffle": False},
        "train.max_epochs": 3,
        **overrides,
    }
    return small_config(tmp_path / name, model=model, **data)


def slow_model(delay=0.03, hidden=(16,), progress=None):
    return {
        "type": "tests.faults.SlowMLP",
        "in_features": 144,  # 1 x 12 x 12
        "num_classes": 3,
        "hidden": list(hidden),
        "dropout": 0.2,
        "delay": delay,
        "progress": progress,
    }


def reference(cfg: dict, tmp_path: Path) -> dict:
    plain = {**cfg, "experiment_name": "reference", "work_dir": str(tmp_path / "reference")}
    pl.run(validate(plain))
    return final_checkpoint(plain)


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_sigkill_mid_epoch_resumes_bitwise(tmp_path, prefect_env, images, workers, monkeypatch):
    # Three workers may be more than this machine's cores, the default quota: the test is
    # the operator and raises it, for itself and the runs it starts.
    quota = str(max(workers, 2))
    monkeypatch.setenv("BATON_MAX_WORKERS", quota)
    prefect_env = {**prefect_env, "BATON_MAX_WORKERS": quota}
    progress = tmp_path / "forwards"
    model = slow_model(progress=str(progress))
    cfg = image_config(
        tmp_path, "killed", images, model, workers, **{"checkpoint.interval_iters": 3}
    )
    process = start(cfg, prefect_env, tmp_path)
    try:
        # forward 14 runs after the iteration-12 checkpoint (mid-epoch 2) is committed
        assert wait_for(lambda: forwards_so_far(progress) >= EPOCH_LENGTH + 6, process)
    finally:
        stop_group(process)
    latest = CheckpointStore(Path(cfg["work_dir"]) / cfg["experiment_name"]).latest()
    assert latest is not None and latest.iter < 3 * EPOCH_LENGTH
    output = finish(cfg, prefect_env, tmp_path)
    assert f"iter {latest.iter}" in output
    assert_same_training_result(reference(cfg, tmp_path), final_checkpoint(cfg))


def test_sigkill_mid_checkpoint_write_with_workers(tmp_path, prefect_env, images):
    model = slow_model(delay=0.0, hidden=(2048, 2048))  # ~36 MB of weights and momentum
    cfg = image_config(tmp_path, "killed-write", images, model, 2, **{"train.max_epochs": 2})
    kill_mid_checkpoint_write(cfg, prefect_env, tmp_path)
    finish(cfg, prefect_env, tmp_path)
    assert_same_training_result(reference(cfg, tmp_path), final_checkpoint(cfg))


def test_a_dead_worker_is_retried_and_the_run_stays_exact(tmp_path, prefect_env, images):
    budget = tmp_path / "reads"
    dying = {"type": "tests.baton.image_folders.DyingImageFolder", "die_at": 5}
    dying["budget"] = str(budget)  # read twice (epochs 1 and 2): dies in epoch 2
    cfg = image_config(tmp_path, "dying", images, slow_model(delay=0.0), 2, dataset=dying)
    output = finish(cfg, prefect_env, tmp_path)
    # How the death reaches the main process depends on timing: DataLoader's "worker
    # exited unexpectedly", or a reset connection while a batch was in flight. Either way
    # the training task failed once and was retried from a rebuilt pipeline.
    assert "Task run 'train-epoch-2' - Task run failed with exception" in output, output[-3000:]
    assert "Retry 1/" in output and "rebuilt the pipeline" in output, output[-3000:]
    assert int(budget.read_text()) >= 3, "the worker never read past its death"
    budget.write_text("100")  # the reference run's workers live
    assert_same_training_result(reference(cfg, tmp_path), final_checkpoint(cfg))
