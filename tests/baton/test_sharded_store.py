"""Contract 13: a sharded checkpoint (a ``.dcp`` folder written through DCP) is committed
once, and is listed, verified, rotated, counted and resumed as one checkpoint (hostile
folders named like one: ``tests/security/test_sharded_checkpoints.py``)."""

import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from baton.checkpoint import io, sharded
from baton.checkpoint.ref import CheckpointRef
from baton.checkpoint.store import CheckpointStore, RetentionPolicy
from baton.checkpoint.writer import CheckpointWriter
from baton.errors import (
    CheckpointCorruptError,
    CheckpointError,
    QuotaError,
    UntrustedInputError,
)
from baton.flows.cli import main
from baton.run.loop import train_epoch
from baton.trust import Quotas, Trust, allowances

from .helpers import EPOCH_LENGTH, assert_bitwise_equal, flat_state, make_loader, make_strategy, mlp
from .sharding import (
    assert_same,
    checkpoint_dict,
    commit_file,
    commit_sharded,
    link_a_shard,
    make_fifo,
    save_skeleton,
    shard_of,
)

EPOCHS = 3
LOGGER = logging.getLogger(__name__)
SGD = {"optimizer": {"type": "SGD", "lr": 0.05, "momentum": 0.9}}


# committing, listing, verifying ---------------------------------------------------------


def test_a_sharded_checkpoint_is_committed_listed_and_latest(tmp_path):
    store = CheckpointStore(tmp_path / "exp")
    first = commit_file(store, 1)
    ref = commit_sharded(store, 2, **{"val/accuracy": 0.5})

    assert ref.uri == str(store.checkpoint_dir / "epoch_0002.dcp")
    assert (ref.size, ref.sha256) == sharded.digest(ref.uri)
    assert ref.size == sum(p.stat().st_size for p in Path(ref.uri).iterdir())
    assert store.list() == [first, ref]
    assert store.latest() == ref
    assert store.best("val/accuracy") == ref
    assert store.find(ref.uri) == ref
    assert store.lineages()[0].checkpoints == (first, ref)
    store.verify(ref)
    report = store.check()
    assert [e.problem for e in report.entries] == [None, None] and report.latest == ref
    assert not list(store.checkpoint_dir.glob(".writing-*"))


def test_a_sharded_checkpoint_is_written_again_at_its_position(tmp_path):
    store = CheckpointStore(tmp_path / "exp")
    commit_sharded(store, 1)
    again = commit_sharded(store, 1, checkpoint=checkpoint_dict(seed=5))
    assert store.list() == [again]
    assert store.committed_at("epoch_0001.dcp", epoch=1, iter=10) == again
    assert_same(io.load(again.uri)["state_dict"], checkpoint_dict(seed=5)["state_dict"])


def _change_a_byte(folder: Path) -> None:
    shard = shard_of(folder)
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # inside the last tensor's bytes: same size, other content
    shard.write_bytes(bytes(data))


def _remove_a_shard(folder: Path) -> None:
    shard_of(folder).unlink()


def _add_a_file(folder: Path) -> None:
    (folder / "__1_0.distcp").write_bytes(b"")


def _remove_the_metadata(folder: Path) -> None:
    (folder / ".metadata").unlink()


def _a_subfolder(folder: Path) -> None:
    (folder / "nested").mkdir()


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (_change_a_byte, "does not match its manifest entry"),
        (_remove_a_shard, "bytes in 2 files but"),
        (_add_a_file, "does not match its manifest entry"),
        (_remove_the_metadata, "not a complete sharded checkpoint"),
        (link_a_shard, "not a regular file"),
        (make_fifo, "not a regular file"),
        (_a_subfolder, "not a regular file"),
    ],
    ids=["changed", "missing", "extra", "no-metadata", "link", "fifo", "subfolder"],
)
def test_a_changed_missing_or_extra_shard_makes_the_checkpoint_damaged(tmp_path, damage, said):
    store = CheckpointStore(tmp_path / "exp")
    older = commit_sharded(store, 1)
    newest = commit_sharded(store, 2)
    damage(Path(newest.uri))

    with pytest.raises(CheckpointError, match=said):
        store.verify(newest)
    assert not store.is_valid(newest)
    assert store.latest() == older
    report = store.check()
    assert report.entries[0].problem is None and said in report.entries[1].problem
    assert report.latest == older
    # the load checks the very bytes it reads
    with pytest.raises(CheckpointError), io.expect_bytes(newest.uri, newest.size, newest.sha256):
        io.load(newest.uri)


def test_a_link_to_a_sharded_folder_is_not_a_checkpoint_of_the_store(tmp_path):
    store = CheckpointStore(tmp_path / "exp")
    ref = commit_sharded(store, 1)
    elsewhere = tmp_path / "elsewhere.dcp"
    Path(ref.uri).rename(elsewhere)
    Path(ref.uri).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(CheckpointError, match="symbolic link"):
        store.verify(ref)
    assert store.latest() is None


# rotation ---------------------------------------------------------------------------------


def test_rotation_deletes_a_sharded_checkpoint_whole(tmp_path):
    store = CheckpointStore(tmp_path / "exp", retention=RetentionPolicy(keep_last=1))
    commit_sharded(store, 1)
    commit_file(store, 2)
    newest = commit_sharded(store, 3)
    assert sorted(os.listdir(store.checkpoint_dir)) == ["epoch_0003.dcp"]
    assert store.list() == [newest]


def test_prune_deletes_sharded_checkpoints_whole(tmp_path):
    store = CheckpointStore(tmp_path / "exp")
    for epoch in (1, 2, 3):
        commit_sharded(store, epoch)
    with store.lock():
        dropped = store.prune(RetentionPolicy(keep_last=1))
    assert [Path(r.uri).name for r in dropped] == ["epoch_0001.dcp", "epoch_0002.dcp"]
    assert sorted(os.listdir(store.checkpoint_dir)) == ["epoch_0003.dcp"]


class Killed(BaseException):
    """The process dying in the middle of a deletion."""


def test_a_kill_during_the_deletion_leaves_nothing_resume_picks(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path / "exp", retention=RetentionPolicy(keep_last=1))
    commit_sharded(store, 1)

    def killed(path, *args, **kwargs):
        raise Killed

    monkeypatch.setattr(sharded.shutil, "rmtree", killed)
    with pytest.raises(Killed):
        commit_sharded(store, 2)
    monkeypatch.undo()

    # the commit is durable; the dropped folder is out of its name, half deleted or not
    assert sorted(os.listdir(store.checkpoint_dir)) == [
        ".deleting-epoch_0001.dcp",
        "epoch_0002.dcp",
    ]
    fresh = CheckpointStore(tmp_path / "exp")
    assert [Path(r.uri).name for r in fresh.list()] == ["epoch_0002.dcp"]
    assert Path(fresh.latest().uri).name == "epoch_0002.dcp"
    assert [Path(r.uri).name for r in fresh.rebuild()] == ["epoch_0002.dcp"]
    with fresh.lock():  # the next run's lock removes what the kill left
        pass
    assert sorted(os.listdir(store.checkpoint_dir)) == ["epoch_0002.dcp"]


def test_rotation_leaves_alone_a_folder_that_holds_a_link(tmp_path):
    store = CheckpointStore(tmp_path / "exp", retention=RetentionPolicy(keep_last=1))
    first = commit_sharded(store, 1)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data").write_text("keep me")
    (Path(first.uri) / "evil").symlink_to(precious, target_is_directory=True)
    commit_sharded(store, 2)
    assert (precious / "data").read_text() == "keep me"
    assert Path(first.uri).is_dir()  # not deleted: it no longer is a plain sharded folder
    assert [Path(r.uri).name for r in store.list()] == ["epoch_0002.dcp"]


# leftovers of killed writers ------------------------------------------------------------


def test_a_folder_a_killed_writer_left_is_never_read_and_removed_under_the_lock(tmp_path):
    store = CheckpointStore(tmp_path / "exp")
    ref = commit_sharded(store, 1)
    target = store.target("epoch_0002.dcp")
    sharded.write(checkpoint_dict(2), sharded.writing_folder(target), save_skeleton=save_skeleton)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "file").write_text("not ours")
    (store.checkpoint_dir / ".writing-link.dcp").symlink_to(outside, target_is_directory=True)

    assert store.latest() == ref
    assert [Path(r.uri).name for r in store.rebuild()] == ["epoch_0001.dcp"]
    assert sharded.writing_folder(target).is_dir()  # a reader never removes anything
    with store.lock():
        pass
    assert not sharded.writing_folder(target).exists()
    assert (outside / "file").read_text() == "not ours"  # a link is not followed


def test_rebuild_takes_sharded_checkpoints_from_their_folders(tmp_path):
    store = CheckpointStore(tmp_path / "exp")
    commit_file(store, 1)
    ref = commit_sharded(store, 2)
    store.manifest_path.write_text("{ torn")
    rebuilt = store.rebuild()
    assert [(Path(r.uri).name, r.size, r.sha256) for r in rebuilt][-1] == (
        "epoch_0002.dcp",
        ref.size,
        ref.sha256,
    )
    assert store.latest().sha256 == ref.sha256


# quotas -----------------------------------------------------------------------------------


def quotas(**limits) -> Quotas:
    values = {
        "max_parameters": 10**9,
        "max_experiment_bytes": 10**12,
        "max_experiment_files": 10**6,
        "min_free_bytes": 1,
        "max_workers": 2,
        "max_iterations": 10**6,
        "max_processes": 2,
    }
    return Quotas(**(values | limits))


def test_usage_and_quotas_count_a_sharded_checkpoint_as_one_file_of_all_its_bytes(tmp_path):
    store = CheckpointStore(tmp_path / "exp")
    first = commit_sharded(store, 1)
    second = commit_file(store, 2)
    assert len(os.listdir(first.uri)) == 3
    assert store.usage() == (2, first.size + second.size)
    assert store.usage(replacing=first.uri) == (1, second.size)

    checkpoint = checkpoint_dict(3)
    target = str(store.target("epoch_0003.dcp"))
    writer = CheckpointWriter(LOGGER, quotas=quotas())
    writer.check_room(store, checkpoint, target)
    with pytest.raises(QuotaError, match="3 checkpoint files"):
        CheckpointWriter(LOGGER, quotas=quotas(max_experiment_files=2)).check_room(
            store, checkpoint, target
        )
    with pytest.raises(QuotaError, match="max_experiment_bytes"):
        CheckpointWriter(
            LOGGER,
            quotas=quotas(max_experiment_bytes=first.size + second.size + 100),
        ).check_room(store, checkpoint, target)


# the CLI ----------------------------------------------------------------------------------


def test_ckpt_list_shows_a_sharded_checkpoint_as_one_line(tmp_path, capsys):
    store = CheckpointStore(tmp_path / "exp")
    commit_file(store, 1)
    ref = commit_sharded(store, 2)
    assert main(["ckpt", "list", str(store.root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len([line for line in out if line.startswith("ok")]) == 2
    assert out[1].startswith("ok") and ref.uri in out[1] and "<- latest" in out[1]

    _change_a_byte(Path(ref.uri))
    assert main(["ckpt", "list", str(store.root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("INVALID") and "<- latest" in out[0]


def test_ckpt_inspect_says_a_checkpoint_is_sharded_and_lists_its_files(tmp_path, capsys):
    store = CheckpointStore(tmp_path / "exp")
    ref = commit_sharded(store, 2, checkpoint=checkpoint_dict(2, world_size=2))
    assert main(["ckpt", "inspect", ref.uri]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sharded"] is True and summary["world_size"] == 2
    assert (summary["size"], summary["sha256"]) == (ref.size, ref.sha256)
    assert sorted(summary["files"]) == [".metadata", "__0_0.distcp", "baton.pt"]
    assert sum(summary["files"].values()) == ref.size
    assert summary["sections"] == ["meta", "optimizer", "param_schedulers", "state_dict"]
    assert summary["meta"]["epoch"] == 1 and "rng" not in summary["meta"]

    plain = commit_file(store, 3)
    assert main(["ckpt", "inspect", plain.uri]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sharded"] is False and "files" not in summary


def test_ckpt_inspect_refuses_a_folder_that_is_not_a_sharded_checkpoint(tmp_path, capsys):
    store = CheckpointStore(tmp_path / "exp")
    ref = commit_sharded(store, 1)
    _remove_the_metadata(Path(ref.uri))
    plain = tmp_path / "plain"
    plain.mkdir()
    for path, said in ((ref.uri, "not a complete sharded checkpoint"), (plain, "a directory")):
        assert main(["ckpt", "inspect", str(path)]) == 1
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1


# loading: the same dict as a .pth; resume; what evaluate reads ------------------------------


def test_a_sharded_checkpoint_loads_as_the_dict_its_pth_holds_and_back(tmp_path):
    store = CheckpointStore(tmp_path / "exp")
    original = checkpoint_dict(4)
    pth = tmp_path / "one.pth"
    io.save(original, str(pth))
    from_pth = io.load(str(pth))

    ref = commit_sharded(store, 1, checkpoint=from_pth)
    from_dcp = io.load(ref.uri)
    assert_same(from_dcp, from_pth)
    assert_same(io.load_meta(ref.uri), from_pth["meta"])

    again = tmp_path / "again.pth"  # and back: the loaded sharded dict saved as a file
    io.save(from_dcp, str(again))
    assert_same(io.load(str(again)), original)


def prepared(work_dir):
    strategy = make_strategy(work_dir)
    strategy.prepare(
        mlp(),
        optim_wrapper=SGD,
        dispatch_kwargs={
            "max_epochs": EPOCHS,
            "max_iters": EPOCHS * EPOCH_LENGTH,
            "epoch_length": EPOCH_LENGTH,
        },
    )
    return strategy


def train_until(strategy, max_iters: int) -> None:
    while strategy.iter < max_iters:
        train_epoch(strategy, make_loader(), loss_fn=nn.CrossEntropyLoss(), max_iters=max_iters)


def test_a_run_resumed_from_a_sharded_checkpoint_ends_bitwise_equal(tmp_path):
    total = EPOCHS * EPOCH_LENGTH
    straight = prepared(tmp_path / "a")
    train_until(straight, total)

    first = prepared(tmp_path / "b")
    train_until(first, EPOCH_LENGTH)
    saved = first.save_checkpoint("epoch_0001.pth")
    store = CheckpointStore(tmp_path / "b" / "exp")
    ref = commit_sharded(store, 1, checkpoint=io.load(saved.uri))
    Path(saved.uri).unlink()  # only the sharded checkpoint is left to resume from
    del first
    torch.manual_seed(12345)  # what another job in the process might do meanwhile
    random.seed(12345)
    np.random.seed(12345)

    second = prepared(tmp_path / "b")
    latest = store.latest()
    assert latest == ref
    with io.expect_bytes(latest.uri, latest.size, latest.sha256):
        second.resume(latest.uri)
    assert second.iter == EPOCH_LENGTH
    train_until(second, total)
    assert_bitwise_equal(flat_state(straight), flat_state(second))


def test_a_sharded_checkpoint_may_be_named_where_a_checkpoint_file_may(tmp_path):
    """What ``load-checkpoint`` (and so ``evaluate``) does with a path it is given."""
    store = CheckpointStore(tmp_path / "exp")
    ref = commit_sharded(store, 1)
    trust = Trust.from_environment()
    assert trust.check_checkpoint(ref.uri, experiment_dir=store.root, what="checkpoint") == ref.uri
    assert CheckpointRef.of_file(ref.uri).sha256 == ref.sha256

    link = store.root / "link.dcp"
    link.symlink_to(ref.uri, target_is_directory=True)
    plain = store.root / "plain"
    plain.mkdir()
    for path in (link, plain):
        with pytest.raises(UntrustedInputError, match="is a folder"):
            trust.check_checkpoint(str(path), experiment_dir=store.root, what="checkpoint")
    with pytest.raises(CheckpointError, match="is a folder"):
        io.load(str(link))  # a link to a folder is not a sharded checkpoint, at any layer


def test_trust_knows_the_sharded_suffix_of_the_checkpoint_package():
    assert allowances.SHARDED_CHECKPOINT_SUFFIX == sharded.SUFFIX


def test_the_load_checkpoint_and_evaluate_tasks_take_a_sharded_checkpoint(tmp_path):
    """What ``baton evaluate`` runs: the same metrics from a checkpoint and its sharded copy."""
    from prefect.settings import PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW, temporary_settings

    from baton import tasks
    from baton.config import validate
    from baton.run import pipeline as pl
    from baton.tasks.state import config_of, forget
    from baton.trust import deployment_environment

    from .helpers import small_pipeline

    data = small_pipeline(tmp_path / "wd") | {"train": {"max_epochs": 1}}
    _, ref = pl.run(validate(data))
    store = CheckpointStore(Path(ref.uri).parent.parent)
    copy = commit_sharded(store, 2, checkpoint=io.load(ref.uri))
    metrics = []
    with (
        temporary_settings({PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW: "ignore"}),
        deployment_environment(None),
    ):
        cfg = tasks.validate_config.fn(data)
        for uri in (ref.uri, copy.uri):
            state = tasks.load_checkpoint.fn(cfg, uri)
            try:
                state = tasks.evaluate.fn(cfg, state, state.epoch)
            finally:
                forget(config_of(cfg))
            assert state.checkpoint.uri == uri and state.epoch == 1
            metrics.append(state.metrics)
    assert "val/accuracy" in metrics[0] and metrics[0] == metrics[1]


def test_a_sharded_folder_that_is_not_whole_is_not_committed(tmp_path):
    store = CheckpointStore(tmp_path / "exp")
    ref = commit_sharded(store, 1)
    target = store.target("epoch_0002.dcp")
    sharded.write(checkpoint_dict(2), target, save_skeleton=save_skeleton)
    (target / ".metadata").unlink()  # a rank's write that never finished
    with pytest.raises(CheckpointCorruptError, match="not a complete sharded checkpoint"):
        store.commit(str(target), epoch=2, iter=20, size=1, sha256="0" * 64)
    assert store.list() == [ref]


def test_a_pipeline_auto_resumes_from_a_sharded_checkpoint_bitwise_equal(tmp_path):
    """The run's own path: find the resume point, verify, load with the bytes checked."""
    from baton.config import validate
    from baton.run import pipeline as pl

    from .helpers import small_pipeline

    def config(work_dir: Path, epochs: int):
        return validate(small_pipeline(work_dir) | {"train": {"max_epochs": epochs}})

    straight, _ = pl.run(config(tmp_path / "a", 3))
    _, first = pl.run(config(tmp_path / "b", 1))
    store = CheckpointStore(Path(first.uri).parent.parent)
    checkpoint = io.load(first.uri)
    target = store.target("epoch_0001.dcp")
    sharded.write(checkpoint, sharded.writing_folder(target), save_skeleton=save_skeleton)
    size, sha = sharded.publish(sharded.writing_folder(target), target)
    meta = checkpoint["meta"]
    store.commit(str(target), epoch=meta["epoch"], iter=meta["iter"], size=size, sha256=sha)
    Path(first.uri).unlink()  # only the sharded checkpoint can be resumed

    resumed, last = pl.run(config(tmp_path / "b", 3))
    assert resumed.strategy.epoch == 3 and Path(last.uri).name == "epoch_0003.pth"
    assert not Path(first.uri).exists()  # epoch 1 was not trained again
    names = [Path(r.uri).name for r in store.lineages()[-1].checkpoints]
    assert names == ["epoch_0001.pth", "epoch_0001.dcp", "epoch_0002.pth", "epoch_0003.pth"]
    assert_bitwise_equal(flat_state(straight.strategy), flat_state(resumed.strategy))


def test_baton_evaluate_checks_a_sharded_checkpoint_before_any_run(tmp_path):
    from baton.config import load_config
    from baton.flows.cli import _check_evaluation

    from .helpers import small_pipeline

    cfg = load_config(small_pipeline(tmp_path / "wd"))
    store = CheckpointStore(tmp_path / "wd" / "exp")
    ref = commit_sharded(store, 1)
    _check_evaluation(cfg, ref.uri)
    _remove_the_metadata(Path(ref.uri))
    with pytest.raises(CheckpointCorruptError, match="not a complete sharded checkpoint"):
        _check_evaluation(cfg, ref.uri)
