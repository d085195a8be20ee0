"""Contract 12: a run can only add to an experiment. Retention is the experiment's, fixed
when it was created; a fork never changes what the original config resumes."""

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch

from baton import RetentionPolicy
from baton.errors import RetentionConflictError
from baton.experiment import Experiment
from baton.run import pipeline as pl

from .helpers import assert_bitwise_equal, flat_state, make_strategy, mlp
from .test_pipeline import cfg_for


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def team_a(tmp_path, *overrides, **top):
    """team-a's config C (every checkpoint kept), with changes."""
    return cfg_for(
        tmp_path, "checkpoint.keep_last=null", *overrides, experiment_name="team-a", **top
    )


def test_a_run_cannot_shrink_the_retention_the_experiment_was_created_with(tmp_path):
    _, ref = pl.run(team_a(tmp_path, "train.max_epochs=3"))
    root = Path(ref.uri).parents[1]
    before = digests(root / "checkpoints")
    manifest = (root / "manifest.json").read_bytes(), (root / "manifest.journal").read_bytes()

    hostile = team_a(tmp_path, "checkpoint.keep_last=1", "train.max_epochs=4")
    with pytest.raises(
        RetentionConflictError, match=r"keep_last=None.*keep_last=1.*baton ckpt"
    ) as e:
        pl.run(hostile)
    assert "\n" not in str(e.value)
    assert digests(root / "checkpoints") == before  # epochs 1-3 untouched, nothing new
    after = (root / "manifest.json").read_bytes(), (root / "manifest.journal").read_bytes()
    assert after == manifest


def test_the_experiment_records_its_retention_when_a_pipeline_creates_it(tmp_path):
    cfg = cfg_for(tmp_path, "train.max_epochs=1", "checkpoint.keep_last=2")
    p, _ = pl.run(cfg)
    assert p.experiment.recorded_retention() == RetentionPolicy(keep_last=2)
    record = json.loads((p.experiment.root / "experiment.json").read_text())
    assert record["retention"]["keep_last"] == 2
    # the same retention, any other change of the free keys: accepted
    again, _ = pl.run(cfg_for(tmp_path, "train.max_epochs=2", "checkpoint.keep_last=2"))
    assert again.strategy.epoch == 2


def test_an_experiment_without_a_record_adopts_the_first_runs_retention(tmp_path, caplog):
    p, _ = pl.run(team_a(tmp_path, "train.max_epochs=1"))
    (p.experiment.root / "experiment.json").unlink()  # as an experiment made before records
    with caplog.at_level(logging.WARNING, logger="baton"):
        later, _ = pl.run(team_a(tmp_path, "train.max_epochs=2", "checkpoint.keep_last=4"))
    assert "records no retention" in caplog.text and "keep_last=4" in caplog.text
    assert later.experiment.recorded_retention() == RetentionPolicy(keep_last=4)


def test_the_operator_changes_the_recorded_retention(tmp_path):
    p, _ = pl.run(team_a(tmp_path, "train.max_epochs=3"))
    with p.experiment.lock():
        p.experiment.set_retention(RetentionPolicy(keep_last=1))
    later, _ = pl.run(team_a(tmp_path, "train.max_epochs=4", "checkpoint.keep_last=1"))
    assert [r.epoch for r in later.strategy.checkpoints.list()] == [4]


def test_the_strategy_as_a_library_keeps_every_checkpoint_and_records_nothing(tmp_path):
    strategy = make_strategy(tmp_path)
    strategy.prepare(mlp(), optim_wrapper={"optimizer": {"type": "SGD", "lr": 0.1}})
    for epoch in range(1, 4):
        strategy.save_checkpoint(f"epoch_{epoch:04d}.pth")
    assert len(strategy.checkpoints.list()) == 3
    assert strategy.experiment.recorded_retention() is None
    assert not (strategy.experiment_dir / "experiment.json").exists()


def test_a_fork_never_changes_what_the_original_config_resumes(tmp_path, caplog):
    pl.run(team_a(tmp_path, "train.max_epochs=2"))
    fork = team_a(
        tmp_path,
        "train.max_epochs=3",
        "randomness.seed=11",
        "optim_wrapper.optimizer.lr=0.02",
        fork=True,
    )
    forked, _ = pl.run(fork)
    assert forked.strategy.epoch == 3
    store = forked.experiment.store
    assert [lin.reason for lin in store.lineages()] == ["first", "fork"]

    with caplog.at_level(logging.INFO, logger="baton"):
        p, ref = pl.run(team_a(tmp_path, "train.max_epochs=4"))
    assert p.strategy.epoch == 4
    skipped = [r.getMessage() for r in caplog.records if "skipped lineage L2" in r.getMessage()]
    assert len(skipped) == 1
    assert "randomness.seed: 11 -> 0" in skipped[0]
    assert "optim_wrapper.optimizer.lr: 0.02 -> 0.1" in skipped[0]
    # the fork's lineage keeps its files, and the original line goes on from epoch 2
    assert [r.epoch for r in store.lineages()[1].checkpoints] == [3]
    assert ref.epoch == 4 and store.lineages()[-1].parent.epoch == 2

    straight, _ = pl.run(team_a(tmp_path, "train.max_epochs=4", work_dir=str(tmp_path / "s")))
    assert_bitwise_equal(flat_state(p.strategy), flat_state(straight.strategy))
    on_disk = torch.load(ref.uri, weights_only=True)["state_dict"]
    for key, value in straight.strategy.model.state_dict().items():
        assert torch.equal(on_disk[key], value)

    # the fork's own config (forking no more) finds its lineage again
    again, _ = pl.run(fork.model_copy(update={"fork": False, "resume": "auto"}))
    assert again.strategy.epoch == 3 and again.strategy.seed == 11


def test_a_config_that_matches_no_lineage_is_refused_against_the_newest(tmp_path):
    pl.run(team_a(tmp_path, "train.max_epochs=2"))
    with pytest.raises(Exception, match=r"optim_wrapper.optimizer.lr: 0.1 -> 0.3"):
        pl.run(team_a(tmp_path, "train.max_epochs=3", "optim_wrapper.optimizer.lr=0.3"))


def test_experiment_ran_checks_the_crashed_runs_log(tmp_path):
    experiment = Experiment(tmp_path / "wd", "exp")
    run_id = "0f9b3a52-3c1e-4c55-9d4a-6c9b7f3e2a10"
    assert not experiment.ran(run_id)
    experiment.flow_log_path(run_id).parent.mkdir(parents=True)
    experiment.flow_log_path(run_id).write_text("started\n")
    assert experiment.ran(run_id)
    for hostile in ("../x", "", "a/b", "..", "x" * 300, None):
        assert not experiment.ran(hostile)
