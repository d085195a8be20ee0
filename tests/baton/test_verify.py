"""`baton verify`: a checkpoint trained again from an earlier one of its lineage equals it bit
for bit; a changed weight is found and named; pairs that cannot be verified are refused."""

import hashlib
import os
from pathlib import Path

import pytest
import torch

from baton.checkpoint import io
from baton.config import load_config
from baton.errors import VerificationRefusedError
from baton.experiment import Experiment
from baton.flows.cli import main
from baton.run import pipeline as pl
from baton.run import verify as v

from .helpers import HALVING_PLATEAU, small_pipeline


def config(work_dir, **changes):
    data = small_pipeline(work_dir)
    # Per-sample noise from random, numpy and torch, read by two worker processes.
    data["train_data"] = {
        "dataset": {"type": "tests.baton.noisy.AugmentedSynthetic", "num_samples": 128},
        "batch_size": 32,
        "num_workers": 2,
    }
    data["train"]["max_epochs"] = 3
    data["checkpoint"]["interval_iters"] = 3
    data.update(changes)
    return load_config(data)


def trained(tmp_path, **changes):
    cfg = config(tmp_path / "wd", **changes)
    p, _ = pl.run(cfg)
    p.train_loader.close()
    return Experiment.of(cfg), cfg


def snapshot(root: Path) -> dict:
    """Every folder, and every file with its bytes' digest and modification time."""
    found = {}
    for folder, _, files in os.walk(root):
        found[folder] = Path(folder).stat().st_mtime
        for name in files:
            path = Path(folder) / name
            found[str(path)] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime)
    return found


def by_name(experiment, name):
    return next(r for r in experiment.store.list() if Path(r.uri).name == name)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    return trained(tmp_path_factory.mktemp("verify"))[0]


def test_an_experiments_newest_checkpoint_verifies_bitwise_and_nothing_is_written(experiment):
    before = snapshot(experiment.root)
    a, b = v.pair_of(experiment)
    assert (Path(a.uri).name, Path(b.uri).name) == ("iter_000009.pth", "epoch_0003.pth")
    verdict = v.verify(experiment, a, b)
    assert verdict.equal, verdict.lines()
    assert verdict.compared > 50  # model, optimizer, schedulers, RNG states, meta
    assert verdict.headline().startswith("bitwise equal")
    assert snapshot(experiment.root) == before


def test_a_long_stretch_across_epochs_and_validations_verifies(experiment):
    a, b = by_name(experiment, "iter_000003.pth"), by_name(experiment, "iter_000009.pth")
    verdict = v.verify(experiment, a, b)
    assert verdict.equal, verdict.lines()


ADAMW_ACCUMULATED = {
    "optim_wrapper": {
        "optimizer": {"type": "AdamW", "lr": 0.01},
        "accumulative_counts": 3,
        "clip_grad": {"max_norm": 1.0},
    },
    "param_scheduler": [{"type": "LinearLR", "start_factor": 0.1, "by_epoch": False, "end": 5}],
}
PLATEAU = {"param_scheduler": [HALVING_PLATEAU]}


@pytest.mark.parametrize("changes", [ADAMW_ACCUMULATED, PLATEAU], ids=["accumulation", "plateau"])
def test_every_pair_of_a_lineage_verifies(tmp_path, changes):
    """Inside accumulation windows (gradients saved mid-window), and with a schedule that
    follows validation (the replay validates where the run did)."""
    experiment, _ = trained(tmp_path, **changes)
    refs = experiment.store.list()
    for a, b in [(refs[0], refs[-1]), (refs[1], refs[2]), (refs[2], refs[4])]:
        verdict = v.verify(experiment, a, b)
        assert verdict.equal, verdict.lines()


def test_the_cli_exits_0_for_an_equal_pair(experiment, capsys):
    a, b = by_name(experiment, "epoch_0001.pth"), by_name(experiment, "epoch_0002.pth")
    assert main(["verify", a.uri, b.uri]) == 0
    assert capsys.readouterr().out.startswith("bitwise equal")


def test_a_changed_weight_is_found_and_named(tmp_path, capsys):
    experiment, _ = trained(tmp_path, train={"max_epochs": 2})
    b = experiment.store.latest()
    checkpoint = io.load(b.uri)
    checkpoint["state_dict"]["net.0.weight"][3, 1] += 1e-3
    size, digest = io.save(checkpoint, b.uri)  # a valid file, and a valid manifest entry
    experiment.store.commit(b.uri, epoch=b.epoch, iter=b.iter, size=size, sha256=digest)
    experiment.store.verify(experiment.store.latest())
    a, b = v.pair_of(experiment)
    verdict = v.verify(experiment, a, b)
    assert not verdict.equal and verdict.total == 1
    [difference] = verdict.differences
    assert difference.name == "state_dict.net.0.weight"
    assert difference.count == 1 and difference.max_abs == pytest.approx(1e-3, rel=1e-3)
    assert main(["verify", str(experiment.root)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("DIFFERS") and "state_dict.net.0.weight: 1 of " in out
    assert "max abs 0.001" in out


def test_a_pair_across_lineages_is_refused(tmp_path, capsys):
    experiment, cfg = trained(tmp_path, train={"max_epochs": 2})
    pl.run(cfg.model_copy(update={"resume": "never"}))  # a fresh lineage, L2
    a = by_name(experiment, "epoch_0001.pth")
    b = by_name(experiment, "L2-epoch_0002.pth")
    with pytest.raises(VerificationRefusedError, match="not of one lineage"):
        v.pair_of(experiment, a.uri, b.uri)
    assert main(["verify", a.uri, b.uri]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not of one lineage" in err and "baton ckpt list" in err
    with pytest.raises(VerificationRefusedError, match="not later than A"):
        v.pair_of(experiment, b.uri, by_name(experiment, "L2-iter_000003.pth").uri)


def test_a_forked_pair_verifies_as_the_fork_it_was(tmp_path, capsys):
    experiment, cfg = trained(tmp_path, train={"max_epochs": 2})
    source = by_name(experiment, "epoch_0002.pth")
    fork = load_config(
        {
            **cfg.model_dump(mode="json"),
            "resume": source.uri,
            "fork": True,
            "train": {"max_epochs": 3},
            "optim_wrapper": {"optimizer": {"type": "SGD", "lr": 0.02, "momentum": 0.9}},
        }
    )
    p, forked = pl.run(fork)
    p.train_loader.close()
    assert Path(forked.uri).name == "L2-epoch_0003.pth"
    verdict = v.verify(experiment, source, forked)
    assert verdict.equal, verdict.lines()
    # A pair that reaches back past the fork's start is verified in two steps.
    first = by_name(experiment, "epoch_0001.pth")
    with pytest.raises(VerificationRefusedError, match="separately"):
        v.pair_of(experiment, first.uri, forked.uri)


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        ("torch", "1.13.1", f"torch: 1.13.1 -> {torch.__version__}"),
        ("cpu_threads", 64, "OMP_NUM_THREADS=64)"),  # what to set to verify here
    ],
)
def test_an_environment_that_breaks_exactness_is_refused(tmp_path, capsys, field, value, said):
    experiment, _ = trained(tmp_path, train={"max_epochs": 1})
    b = experiment.store.latest()
    checkpoint = io.load(b.uri)
    checkpoint["meta"]["environment"][field] = value
    size, digest = io.save(checkpoint, b.uri)
    experiment.store.commit(b.uri, epoch=b.epoch, iter=b.iter, size=size, sha256=digest)
    assert main(["verify", str(experiment.root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert said in err and "breaks bitwise equality" in err


def test_an_old_checkpoint_without_fingerprint_is_verified_with_a_note(tmp_path):
    experiment, _ = trained(tmp_path, train={"max_epochs": 1})
    b = experiment.store.latest()
    checkpoint = io.load(b.uri)
    del checkpoint["meta"]["environment"]
    size, digest = io.save(checkpoint, b.uri)
    experiment.store.commit(b.uri, epoch=b.epoch, iter=b.iter, size=size, sha256=digest)
    verdict = v.verify(experiment, *v.pair_of(experiment))
    assert verdict.equal, verdict.lines()
    assert any("no environment fingerprint" in note for note in verdict.notes)


def test_bad_input_is_refused_in_one_line(tmp_path, capsys, experiment):
    stray = tmp_path / "stray.pth"
    stray.write_bytes(Path(experiment.store.latest().uri).read_bytes())
    assert main(["verify", str(stray), experiment.store.latest().uri]) == 2
    assert "not a committed checkpoint" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("baton: ")
