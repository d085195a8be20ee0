"""Contract 9: a refused run changes nothing. Whatever refuses it (another model, a key
that changes the run, an unsafe file, a held lock, another retention), the experiment
folder is byte for byte what it was, and the next plain run resumes what it resumed
before."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from baton.config import load_config
from baton.errors import (
    CheckpointMismatchError,
    ExperimentLockedError,
    ResumeConfigError,
    RetentionConflictError,
    UnsafeCheckpointError,
)
from baton.run import pipeline as pl

from .helpers import small_pipeline


def small(tmp_path, *overrides, **top):
    """A tiny pipeline (8 iterations per epoch), the last two checkpoints kept."""
    data = {
        **small_pipeline(tmp_path / "wd"),
        "model": {"type": "MLP", "in_features": 8, "num_classes": 3, "hidden": [16]},
        "param_scheduler": [],
        "checkpoint": {"keep_last": 2},
        "train": {"max_epochs": 2},
        **top,
    }
    return load_config(data, list(overrides))


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every entry under ``root``: a file's bytes, ``None`` for a folder. A run's own log
    (``runs/<time>/``, the lines that say why it was refused) is its record, not the
    experiment's state, and is left out; the restart log is not."""
    return {
        str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(root.rglob("*"))
        if not (p.relative_to(root).parts[0] == "runs" and p.name != "restarts.json")
    }


@pytest.fixture
def experiment(tmp_path):
    """An experiment trained for two epochs: lineage 1 holds epoch_0001 and epoch_0002."""
    _, last = pl.run(small(tmp_path))
    root = Path(last.uri).parents[1]
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == [
        "epoch_0001.pth",
        "epoch_0002.pth",
    ]
    return root, last


def refused_changes_nothing(tmp_path, root: Path, last, cfg, error, match: str) -> None:
    """Run ``cfg``, expect it refused with ``error``; the folder is unchanged, and a plain
    run then resumes ``last`` and continues its lineage."""
    before = snapshot(root)
    with pytest.raises(error, match=match):
        pl.run(cfg)
    after = snapshot(root)
    assert after.keys() == before.keys()
    assert [k for k in before if before[k] != after[k]] == []
    plain = small(tmp_path, "train.max_epochs=3")
    assert pl.find_resume_point(plain) == last
    _, ref = pl.run(plain)
    assert Path(ref.uri).name == "epoch_0003.pth"  # lineage 1, not an empty branch


def test_a_resume_with_another_model_changes_nothing(tmp_path, experiment):
    root, last = experiment
    cfg = small(
        tmp_path,
        resume=str(root / "checkpoints" / "epoch_0001.pth"),
        model={"type": "MLP", "in_features": 8, "num_classes": 3, "hidden": [32]},
    )
    refused_changes_nothing(
        tmp_path,
        root,
        last,
        cfg,
        (ResumeConfigError, CheckpointMismatchError),
        "different model",
    )


def test_a_resume_that_changes_the_run_without_a_fork_changes_nothing(tmp_path, experiment):
    root, last = experiment
    cfg = small(
        tmp_path,
        "optim_wrapper.optimizer.lr=0.1",
        resume=str(root / "checkpoints" / "epoch_0001.pth"),
    )
    refused_changes_nothing(tmp_path, root, last, cfg, ResumeConfigError, "lr: 0.05 -> 0.1")


class _Payload:
    """Anything a weights_only load refuses (a class outside the allowlist)."""


def test_a_resume_from_an_unsafe_file_changes_nothing(tmp_path, experiment):
    root, last = experiment
    unsafe = root / "unsafe.pth"
    torch.save({"meta": {"epoch": 1, "iter": 8}, "state_dict": {}, "x": _Payload()}, unsafe)
    cfg = small(tmp_path, resume=str(unsafe))
    refused_changes_nothing(tmp_path, root, last, cfg, UnsafeCheckpointError, None)


def test_a_run_of_a_locked_experiment_changes_nothing(tmp_path, experiment):
    root, last = experiment
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time\n"
            f"f = open({str(root / '.lock')!r}, 'a+')\n"
            "fcntl.flock(f, fcntl.LOCK_EX)\n"
            "f.write('pid holder'); f.flush()\n"
            "print('held', flush=True)\n"
            "time.sleep(120)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(root)
        with pytest.raises(ExperimentLockedError, match="pid holder"):
            pl.run(small(tmp_path, resume=str(root / "checkpoints" / "epoch_0001.pth")))
        assert snapshot(root) == before
    finally:
        holder.kill()
        holder.wait()
    plain = small(tmp_path, "train.max_epochs=3")
    assert pl.find_resume_point(plain) == last


def test_a_run_that_asks_for_another_retention_changes_nothing(tmp_path, experiment):
    root, last = experiment
    cfg = small(
        tmp_path, "checkpoint.keep_last=1", resume=str(root / "checkpoints" / "epoch_0001.pth")
    )
    refused_changes_nothing(tmp_path, root, last, cfg, RetentionConflictError, "keep_last=1")


def test_a_refused_run_does_not_record_the_retention_of_an_experiment_without_one(
    tmp_path, experiment
):
    # An experiment made before baton recorded retention: the run that adopts its policy
    # records it only once every check has passed.
    root, last = experiment
    (root / "experiment.json").unlink()
    cfg = small(
        tmp_path,
        "optim_wrapper.optimizer.lr=0.1",
        resume=str(root / "checkpoints" / "epoch_0001.pth"),
    )
    refused_changes_nothing(tmp_path, root, last, cfg, ResumeConfigError, "lr: 0.05 -> 0.1")
    assert (root / "experiment.json").is_file()  # the plain run recorded it
