"""Contract 11: lineages. A fresh start or a branch never loses what another run committed."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from baton.checkpoint import io, manifest
from baton.checkpoint.ref import CheckpointName
from baton.checkpoint.retention import rotation_drops
from baton.checkpoint.store import CheckpointStore, RetentionPolicy
from baton.config import load_config
from baton.flows.cli import main
from baton.run import pipeline as pl

from .helpers import small_pipeline


def small(tmp_path, *overrides, **top):
    """A tiny pipeline on synthetic data (8 iterations per epoch): no dropout, no
    scheduler, the last two checkpoints kept."""
    data = {
        **small_pipeline(tmp_path / "wd"),
        "model": {"type": "MLP", "in_features": 8, "num_classes": 3, "hidden": [16]},
        "param_scheduler": [],
        "checkpoint": {"keep_last": 2},
        **top,
    }
    return load_config(data, list(overrides))


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def weights(path: str) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def commit(store: CheckpointStore, epoch: int, metrics: dict | None = None):
    path = store.target(str(CheckpointName.for_epoch(epoch)))
    size, digest = io.save({"meta": {"epoch": epoch, "iter": epoch * 10}}, str(path))
    return store.commit(
        str(path), epoch=epoch, iter=epoch * 10, size=size, sha256=digest, metrics=metrics
    )


def test_a_fresh_start_in_a_used_experiment_keeps_both_runs(tmp_path, capsys):
    """Issue 12's reproduction: run 4 epochs, then `--resume never` for 2 epochs with
    another lr, then an automatic run."""
    _, old = pl.run(small(tmp_path))
    experiment = Path(old.uri).parents[1]
    before = digests(experiment / "checkpoints")

    p, new = pl.run(
        small(tmp_path, "train.max_epochs=2", "optim_wrapper.optimizer.lr=0.01", resume="never")
    )
    assert Path(new.uri).name == "L2-epoch_0002.pth" and Path(new.uri).exists()
    store = CheckpointStore(experiment)
    assert [Path(r.uri).name for r in store.head().checkpoints] == [
        "L2-epoch_0001.pth",
        "L2-epoch_0002.pth",
    ]
    after = digests(experiment / "checkpoints")
    assert {k: after[k] for k in before} == before  # the first run's files, byte for byte

    # The new lineage trained exactly what a new experiment would have.
    _, alone = pl.run(
        small(
            tmp_path,
            "train.max_epochs=2",
            "optim_wrapper.optimizer.lr=0.01",
            experiment_name="alone",
        )
    )
    for key, value in weights(alone.uri).items():
        assert torch.equal(weights(new.uri)[key], value)

    # Auto-resume continues the newest lineage, not the one that is further along.
    p, again = pl.run(small(tmp_path, "train.max_epochs=2", "optim_wrapper.optimizer.lr=0.01"))
    assert again == new and p.strategy.epoch == 2
    assert [lin.reason for lin in store.lineages()] == ["first", "fresh"]
    assert main(["ckpt", "list", str(experiment)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in out[:4]] == ["L1", "L1", "L2", "L2"]
    assert "<- latest" in out[3]
    assert out[-1].startswith("lineage L2: fresh") and "auto-resume continues it" in out[-1]


def test_an_explicit_older_checkpoint_starts_a_branch(tmp_path):
    _, straight = pl.run(small(tmp_path, "checkpoint.keep_last=null", "train.max_epochs=3"))
    store = CheckpointStore(Path(straight.uri).parents[1])
    first = store.list()[0]
    before = digests(store.checkpoint_dir)

    _, branch = pl.run(
        small(tmp_path, "checkpoint.keep_last=null", "train.max_epochs=3", resume=first.uri)
    )
    lineages = store.lineages()
    assert [lin.id for lin in lineages] == [1, 2]
    assert lineages[1].reason == "branch" and lineages[1].parent == first
    assert [r.epoch for r in lineages[1].checkpoints] == [2, 3]
    assert Path(branch.uri).name == "L2-epoch_0003.pth"
    # replaying epochs 2-3 from epoch 1 is bitwise the original run
    for key, value in weights(straight.uri).items():
        assert torch.equal(weights(branch.uri)[key], value)
    after = digests(store.checkpoint_dir)
    assert {k: after[k] for k in before} == before

    # auto-resume continues the branch, which stays one lineage
    _, longer = pl.run(small(tmp_path, "checkpoint.keep_last=null", "train.max_epochs=4"))
    assert Path(longer.uri).name == "L2-epoch_0004.pth" and len(store.lineages()) == 2


def test_a_resume_from_the_newest_checkpoint_continues_its_lineage(tmp_path):
    _, ref = pl.run(small(tmp_path, "train.max_epochs=2"))
    assert pl.find_resume_point(small(tmp_path, resume=ref.uri)) == ref
    assert len(CheckpointStore(Path(ref.uri).parents[1]).lineages()) == 1


def test_a_retry_of_the_same_run_continues_its_own_lineage(tmp_path):
    pl.run(small(tmp_path, "train.max_epochs=2"))
    cfg = small(tmp_path, "train.max_epochs=2", resume="never")
    plan = pl.plan_resume(cfg, run_id="run-a")
    assert plan.checkpoint is None
    plan.record(cfg)  # once the run is prepared
    store = CheckpointStore(Path(cfg.work_dir) / cfg.experiment_name)
    ref = commit(store, 1)
    assert pl.find_resume_point(cfg, run_id="run-a") == ref  # a retry of run-a
    plan = pl.plan_resume(cfg, run_id="run-b")  # another run: another lineage
    assert plan.checkpoint is None
    plan.record(cfg)
    assert [lin.run for lin in store.lineages()] == [None, "run-a", "run-b"]


def test_rotation_stays_within_its_lineage_and_keeps_what_it_committed(tmp_path):
    store = CheckpointStore(
        tmp_path / "exp",
        retention=RetentionPolicy(keep_last=1, keep_best=1, best_metric="acc", best_mode="max"),
    )
    for epoch, acc in [(1, 0.9), (2, 0.5), (3, 0.6)]:
        commit(store, epoch, {"acc": acc})
    assert [r.epoch for r in store.list()] == [1, 3]
    store.start_lineage(reason="fresh")
    for epoch, acc in [(1, 0.2), (2, 0.4), (3, 0.3)]:
        last = commit(store, epoch, {"acc": acc})
        assert Path(last.uri).exists()  # never deletes what it just committed
    by_lineage = {lin.id: [r.epoch for r in lin.checkpoints] for lin in store.lineages()}
    # lineage 2 keeps its own best (epoch 2) and last, though lineage 1's best is better
    assert by_lineage == {1: [1, 3], 2: [2, 3]}
    assert store.best("acc").epoch == 1
    assert store.best("acc", lineage=2).metrics["acc"] == 0.4
    names = sorted(p.name for p in store.checkpoint_dir.iterdir())
    assert names == ["L2-epoch_0002.pth", "L2-epoch_0003.pth", "epoch_0001.pth", "epoch_0003.pth"]


def test_a_lineage_never_writes_over_another_lineages_file(tmp_path):
    store = CheckpointStore(tmp_path / "exp")
    first = commit(store, 1)
    store.start_lineage(reason="fresh")
    assert store.target("epoch_0001.pth").name == "L2-epoch_0001.pth"
    with pytest.raises(Exception, match="committed checkpoint of lineage 1"):
        store.check_target(first.uri)


def test_latest_of_a_new_branch_without_commits_is_where_it_started(tmp_path):
    store = CheckpointStore(tmp_path / "exp")
    refs = [commit(store, e) for e in (1, 2, 3)]
    store.start_lineage(parent=refs[0], reason="branch")
    assert store.latest() == refs[0]
    store.start_lineage(reason="fresh")
    assert store.latest() is None


def test_a_manifest_of_the_first_format_is_read_then_migrated_under_the_lock(tmp_path):
    experiment = tmp_path / "exp"
    (experiment / "checkpoints").mkdir(parents=True)
    entries = []
    for seq, epoch in enumerate((3, 4), 1):
        path = experiment / "checkpoints" / f"epoch_{epoch:04d}.pth"
        size, digest = io.save({"meta": {"epoch": epoch, "iter": epoch * 10}}, str(path))
        entries.append(
            {
                "uri": str(path),
                "epoch": epoch,
                "iter": epoch * 10,
                "size": size,
                "sha256": digest,
                "metrics": {"val/accuracy": 0.5 + epoch / 10},
                "seq": seq,
                "created": 1.0,
            }
        )
    manifest = experiment / "manifest.json"
    manifest.write_text(json.dumps({"version": 1, "checkpoints": entries}, indent=2))
    original = manifest.read_bytes()

    store = CheckpointStore(experiment)
    assert store.latest().epoch == 4 and [r.epoch for r in store.list()] == [3, 4]
    assert main(["ckpt", "list", str(experiment)]) == 0
    assert manifest.read_bytes() == original  # reading writes nothing
    assert sorted(p.name for p in experiment.iterdir()) == ["checkpoints", "manifest.json"]
    with store.lock():
        pass
    data = json.loads(manifest.read_text())
    assert data["version"] == 2
    assert [e["path"] for e in data["checkpoints"]] == [
        "checkpoints/epoch_0003.pth",
        "checkpoints/epoch_0004.pth",
    ]
    assert (experiment / "manifest.v1.json").read_bytes() == original
    assert store.latest().epoch == 4 and store.lineages()[0].reason == "migrated"


def test_a_best_metric_the_pipeline_does_not_produce_is_refused_before_any_commit(tmp_path):
    from baton.errors import ConfigError

    cfg = small(tmp_path, "checkpoint.keep_best=1", "checkpoint.best_metric=val/acc")
    with pytest.raises(ConfigError, match=r"'val/acc' is not a metric.*val/accuracy, val/loss"):
        pl.run(cfg)
    assert CheckpointStore(Path(cfg.work_dir) / cfg.experiment_name).list() == []


class _CountingEntries(dict):
    """A manifest's entries that count how many a reader visits."""

    visited = 0

    def values(self):
        for value in super().values():
            _CountingEntries.visited += 1
            yield value

    def __iter__(self):
        for key in super().__iter__():
            _CountingEntries.visited += 1
            yield key

    def __getitem__(self, key):
        _CountingEntries.visited += 1
        return super().__getitem__(key)


def test_rotation_visits_only_what_its_lineage_keeps():
    # An old lineage of 10,000 entries (kept whole) and a new one rotated to 2: a commit of
    # the new one looks at the new lineage's few entries, not at the whole manifest.
    state = manifest.ManifestState()
    state.add_lineage({"id": 1, "reason": "first"})
    state.add_lineage({"id": 2, "reason": "fresh"})

    def entry(lineage: int, n: int) -> dict:
        name = f"L{lineage}-iter_{n:06d}.pth" if lineage > 1 else f"iter_{n:06d}.pth"
        return {
            "seq": state.next_seq,
            "path": f"checkpoints/{name}",
            "lineage": lineage,
            "epoch": 0,
            "iter": n,
            "size": 1,
            "sha256": "0" * 64,
            "metrics": {},
        }

    for n in range(1, 10_001):
        state.apply({"op": "commit", "entry": entry(1, n), "drop": []})
    state.entries = _CountingEntries(state.entries)
    policy = RetentionPolicy(keep_last=2)
    for n in range(1, 50):
        new = entry(2, n)
        _CountingEntries.visited = 0
        drop = rotation_drops(policy, state, new)
        assert _CountingEntries.visited <= 3, "a commit scanned other lineages' entries"
        state.apply({"op": "commit", "entry": new, "drop": drop})
    assert [e["iter"] for e in state.lineage_entries(2)] == [48, 49]
    assert len(state.lineage_entries(1)) == 10_000


def test_rotation_keeps_the_newest_positions_not_the_newest_commits(tmp_path):
    # An older position committed late (a stretch trained again, a background save that
    # finishes after the next iteration checkpoint) never displaces a newer one.
    store = CheckpointStore(tmp_path / "exp", retention=RetentionPolicy(keep_last=2))
    for it in (37, 38, 39):
        commit_iter(store, it)
    commit_iter(store, 18)
    assert sorted(r.iter for r in store.list()) == [18, 38, 39]  # the one just committed stays
    commit_iter(store, 40)
    assert sorted(r.iter for r in store.list()) == [39, 40]
    assert store.latest().iter == 40


def commit_iter(store: CheckpointStore, it: int):
    path = store.target(str(CheckpointName.for_iter(it)))
    epoch = it // 18  # 18 iterations per epoch
    size, digest = io.save({"meta": {"epoch": epoch, "iter": it}}, str(path))
    return store.commit(str(path), epoch=epoch, iter=it, size=size, sha256=digest)


def test_a_fork_from_an_older_checkpoint_is_listed_as_a_fork(tmp_path):
    """Its lineage starts as a branch would (from a checkpoint that has later ones), but
    the run forked: `baton ckpt list` and auto-resume must see a fork."""
    cfg = small_pipeline(tmp_path, "forked")
    cfg["train"] = {"max_epochs": 3}
    pl.run(load_config(cfg))
    store = CheckpointStore(tmp_path / "forked")
    first = next(r for r in store.list() if r.epoch == 1)
    pl.run(load_config(cfg, {"resume": first.uri, "fork": True, "optim_wrapper.optimizer.lr": 0.2}))
    lineages = CheckpointStore(tmp_path / "forked").lineages()
    assert [(line.reason, len(line.checkpoints)) for line in lineages] == [
        ("first", 3),
        ("fork", 2),
    ]
    assert lineages[1].parent.sha256 == first.sha256
