"""An experiment folder moved or deleted while its run trains: the run stops at its next
write with a clear error, writes nothing at the old path, and the moved folder resumes
where it is now, bitwise equal to a run that was never disturbed. And a folder that cannot
be written is a clear, permanent error."""

import errno

import pytest

from baton import ExperimentMovedError, ExperimentNotWritableError
from baton.checkpoint import lock
from baton.run import pipeline as pl
from baton.tasks._common import PERMANENT_ERRORS

from .helpers import assert_bitwise_equal
from .test_pipeline import cfg_for, weights


def _moving_model(tmp_path, to: str) -> dict:
    """A model that moves (or, without ``to``, deletes) the experiment ``wd/base`` in the
    middle of epoch 2 (iteration 12 of 8-iteration epochs), after epoch 1 was committed."""
    return {
        "type": "tests.faults.MovingMLP",
        "in_features": 8,
        "num_classes": 3,
        "dropout": 0.2,
        "move_at": 12,
        "folder": str(tmp_path / "wd" / "base"),
        "to": to,
        "done": str(tmp_path / "moved"),
    }


@pytest.mark.parametrize("async_save", [False, True], ids=["foreground", "background"])
def test_a_moved_experiment_stops_its_run_and_resumes_where_it_is_now(tmp_path, async_save):
    new_place = tmp_path / "elsewhere" / "base"
    model = _moving_model(tmp_path, str(new_place))
    overrides = ("train.max_epochs=4", f"checkpoint.async_save={async_save}")
    cfg = cfg_for(tmp_path, *overrides, model=model)

    with pytest.raises(ExperimentMovedError) as caught:
        pl.run(cfg)
    message = str(caught.value)
    assert str(tmp_path / "wd" / "base") in message and f"moved to '{new_place}'" in message
    assert f"work_dir={new_place.parent}" in message
    assert isinstance(caught.value, PERMANENT_ERRORS)
    assert not (tmp_path / "wd" / "base").exists(), "the run wrote a second half at the old path"
    moved_files = sorted(p.name for p in (new_place / "checkpoints").iterdir())
    if async_save:
        # The background save of epoch 1 may still be writing when the folder moves: its
        # temporary file moves with the folder, and the save commits nothing.
        committed = [n for n in moved_files if not n.endswith(".tmp")]
        assert committed in ([], ["epoch_0001.pth"]), moved_files
    else:
        assert moved_files == ["epoch_0001.pth"]

    moved, ref = pl.run(cfg.model_copy(update={"work_dir": str(new_place.parent)}))
    assert ref.epoch == 4 and not (tmp_path / "wd" / "base").exists()
    assert not list((new_place / "checkpoints").glob(".*.tmp")), "a leftover was kept"
    assert [h["epoch"] for h in moved.history] == [1, 2, 3, 4]
    # The same config trained without a move (the move is spent) is the reference.
    straight, _ = pl.run(cfg.model_copy(update={"work_dir": str(tmp_path / "straight")}))
    assert_bitwise_equal(weights(moved), weights(straight))


def test_a_deleted_experiment_stops_its_run_and_nothing_comes_back(tmp_path):
    cfg = cfg_for(tmp_path, "train.max_epochs=3", model=_moving_model(tmp_path, ""))
    with pytest.raises(ExperimentMovedError, match="was deleted .* while this run trained it"):
        pl.run(cfg)
    assert not (tmp_path / "wd" / "base").exists()


def test_a_moved_experiment_stops_at_the_first_iteration_checkpoint_after_the_move(tmp_path):
    new_place = tmp_path / "elsewhere" / "base"
    model = _moving_model(tmp_path, str(new_place))
    cfg = cfg_for(tmp_path, "train.max_epochs=2", "checkpoint.interval_iters=1", model=model)
    with pytest.raises(ExperimentMovedError):
        pl.run(cfg)
    assert not (tmp_path / "wd" / "base").exists()
    moved, ref = pl.run(cfg.model_copy(update={"work_dir": str(new_place.parent)}))
    assert ref.iter == 16 and not (tmp_path / "wd" / "base").exists()
    straight, _ = pl.run(cfg.model_copy(update={"work_dir": str(tmp_path / "straight")}))
    assert_bitwise_equal(weights(moved), weights(straight))


def test_a_read_only_experiment_folder_is_a_clear_permanent_error(tmp_path, monkeypatch):
    cfg = cfg_for(tmp_path, "train.max_epochs=1")
    pl.run(cfg)
    root = tmp_path / "wd" / "base"
    (root / ".lock").unlink()
    before = sorted(p.name for p in root.rglob("*"))
    real_open = open

    def read_only(path, *args, **kwargs):
        # the suite may run as root, whom a chmod does not stop: the disk says what a
        # read-only folder says
        if str(path) == str(root / ".lock"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(lock, "open", read_only, raising=False)
    with pytest.raises(ExperimentNotWritableError) as caught:
        pl.run(cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_epochs": 2})}))
    message = str(caught.value)
    assert f"'{root}' cannot be written (Permission denied)" in message
    assert "Make the folder writable" in message
    assert isinstance(caught.value, PERMANENT_ERRORS)
    assert sorted(p.name for p in root.rglob("*")) == before
