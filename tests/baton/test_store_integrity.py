"""Issue 16: an experiment owns only its own files, survives being moved or copied; NaN
metrics; a journal that a crash cut short; listings consistent with one committed state."""

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest

from baton.checkpoint import committed, io, manifest
from baton.checkpoint.ref import CheckpointName
from baton.checkpoint.store import CheckpointStore, RetentionPolicy
from baton.errors import CheckpointWriteError, ManifestVersionError
from baton.flows.cli import main

KEEP_2 = RetentionPolicy(keep_last=2)


def commit(store: CheckpointStore, epoch: int, metrics: dict | None = None):
    path = store.target(str(CheckpointName.for_epoch(epoch)))
    size, digest = io.save({"meta": {"epoch": epoch, "iter": epoch * 10}}, str(path))
    return store.commit(
        str(path), epoch=epoch, iter=epoch * 10, size=size, sha256=digest, metrics=metrics
    )


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (links not followed) with the sha256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def first_format(experiment: Path, uris_epochs: list[tuple[str, int]]) -> None:
    """Write a manifest as baton wrote it before lineages: absolute URIs."""
    entries = []
    for seq, (uri, epoch) in enumerate(uris_epochs, 1):
        size, digest = io.sha256_of(uri) if Path(uri).exists() else (1, "0" * 64)
        entries.append(
            {
                "uri": uri,
                "epoch": epoch,
                "iter": epoch * 10,
                "size": size,
                "sha256": digest,
                "metrics": {},
                "seq": seq,
                "created": 1.0,
            }
        )
    (experiment / "manifest.json").write_text(json.dumps({"version": 1, "checkpoints": entries}))


def test_manifest_paths_are_relative_to_the_experiment(tmp_path):
    store = CheckpointStore(tmp_path / "exp")
    commit(store, 1)
    text = store.manifest_path.read_text() + store.journal_path.read_text()
    assert str(tmp_path) not in text and '"path":"checkpoints/epoch_0001.pth"' in text


def test_a_copied_experiment_is_independent(tmp_path):
    original = CheckpointStore(tmp_path / "wd" / "a", retention=KEEP_2)
    for epoch in (1, 2):
        commit(original, epoch)
    shutil.copytree(original.root, tmp_path / "wd" / "b")
    before = tree(original.root)

    copy = CheckpointStore(tmp_path / "wd" / "b", retention=KEEP_2)
    assert Path(copy.latest().uri).parent == copy.checkpoint_dir
    with copy.lock():
        for epoch in (3, 4):
            commit(copy, epoch)
    assert tree(original.root) == before
    assert all(entry.problem is None for entry in original.check().entries)
    assert [r.epoch for r in copy.list()] == [3, 4]


def test_a_copied_experiment_of_the_first_format_uses_its_own_files(tmp_path):
    original = tmp_path / "wd" / "a"
    store = CheckpointStore(original)
    refs = [commit(store, epoch) for epoch in (1, 2)]
    first_format(original, [(r.uri, r.epoch) for r in refs])  # absolute, into the original
    shutil.copytree(original, tmp_path / "wd" / "b")
    before = tree(original)

    copy = CheckpointStore(tmp_path / "wd" / "b", retention=RetentionPolicy(keep_last=1))
    assert copy.latest().uri == str(copy.checkpoint_dir / "epoch_0002.pth")
    with copy.lock():
        commit(copy, 3)
    assert tree(original) == before
    assert sorted(p.name for p in copy.checkpoint_dir.iterdir()) == ["epoch_0003.pth"]


def test_a_moved_experiment_resumes_where_it_was(tmp_path):
    store = CheckpointStore(tmp_path / "old" / "exp", retention=KEEP_2)
    refs = [commit(store, epoch) for epoch in (1, 2)]
    (tmp_path / "new").mkdir()
    shutil.move(store.root, tmp_path / "new" / "exp")

    moved = CheckpointStore(tmp_path / "new" / "exp", retention=KEEP_2)
    latest = moved.latest()
    assert latest.epoch == 2 and latest.sha256 == refs[1].sha256
    assert latest.uri == str(moved.checkpoint_dir / "epoch_0002.pth")
    assert commit(moved, 3).epoch == 3 and [r.epoch for r in moved.list()] == [2, 3]


def test_a_moved_experiment_of_the_first_format_resumes_where_it_was(tmp_path):
    store = CheckpointStore(tmp_path / "old" / "exp")
    refs = [commit(store, epoch) for epoch in (1, 2)]
    first_format(store.root, [(r.uri, r.epoch) for r in refs])
    shutil.move(store.root, tmp_path / "moved")
    assert CheckpointStore(tmp_path / "moved").latest().epoch == 2


def test_a_shared_folder_mounted_at_two_paths(tmp_path):
    (tmp_path / "disk" / "wd").mkdir(parents=True)
    (tmp_path / "mnt").symlink_to(tmp_path / "disk")
    here = CheckpointStore(tmp_path / "disk" / "wd" / "exp", retention=KEEP_2)
    there = CheckpointStore(tmp_path / "mnt" / "wd" / "exp", retention=KEEP_2)
    refs = [commit(here, epoch) for epoch in (1, 2)]

    assert there.latest().uri == str(there.checkpoint_dir / "epoch_0002.pth")
    assert there.find(refs[0].uri).epoch == 1  # a path through the other mount is found
    assert there.owns(refs[0].uri)
    commit(there, 3)
    assert [r.epoch for r in here.list()] == [2, 3]
    assert all(entry.problem is None for entry in here.check().entries)


@pytest.fixture
def outside(tmp_path):
    """A checkpoint file outside the experiment, and its bytes' digest."""
    folder = tmp_path / "outside"
    folder.mkdir()
    secret = folder / "secret.pth"
    io.save({"meta": {"epoch": 9, "iter": 90}}, str(secret))
    return secret


def test_hand_edited_entries_outside_the_experiment_are_reported_never_followed(
    tmp_path, outside, capsys
):
    store = CheckpointStore(tmp_path / "exp", retention=RetentionPolicy(keep_last=1))
    real = commit(store, 1)
    (store.checkpoint_dir / "link.pth").symlink_to(outside)
    size, digest = io.sha256_of(str(outside))
    forged = [
        (str(outside), 7),  # absolute
        (f"checkpoints/../../{outside.parent.name}/{outside.name}", 8),  # '..'
        ("checkpoints/link.pth", 9),  # a symbolic link to it
    ]
    snapshot = json.loads(store.manifest_path.read_text())
    for seq, (path, epoch) in enumerate(forged, 100):
        snapshot["checkpoints"].append(
            {
                "seq": seq,
                "path": path,
                "lineage": 1,
                "epoch": epoch,
                "iter": epoch * 10,
                "size": size,
                "sha256": digest,
                "metrics": {},
                "created": 1.0,
            }
        )
    store.manifest_path.write_text(json.dumps(snapshot))
    before = tree(outside.parent)

    assert store.latest() == real
    report = store.check()
    assert [what for what, _ in report.outside] == [forged[0][0], forged[1][0]]
    link = [e for e in report.entries if e.path == "checkpoints/link.pth"]
    assert "symbolic link" in link[0].problem
    assert main(["ckpt", "list", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert out.count("OUTSIDE") == 2 and "secret.pth" not in out.split("OUTSIDE")[0]

    with store.lock():
        # rotation (keep_last=1, the newest by position) drops everything else of lineage 1
        commit(store, 10)
    assert tree(outside.parent) == before
    assert (store.checkpoint_dir / "link.pth").is_symlink()  # not deleted either
    assert [r.epoch for r in store.list()] == [10]


def test_a_first_format_entry_outside_the_experiment_is_reported(tmp_path, outside):
    store = CheckpointStore(tmp_path / "exp", retention=RetentionPolicy(keep_last=1))
    real = commit(store, 1)
    first_format(store.root, [(real.uri, 1), (str(outside), 9)])
    before = tree(outside.parent)
    assert store.latest().epoch == 1
    with store.lock():
        commit(store, 2)
    assert tree(outside.parent) == before
    assert [what for what, _ in store.check().outside] == [str(outside)]


def test_a_symlinked_checkpoints_folder_is_not_followed(tmp_path, outside):
    store = CheckpointStore(tmp_path / "exp")
    commit(store, 1)
    shutil.rmtree(store.checkpoint_dir)
    store.checkpoint_dir.symlink_to(outside.parent)
    shutil.copy(outside, outside.parent / "epoch_0001.pth")
    assert store.latest() is None
    assert "symbolic link" in store.check().entries[0].problem


@pytest.mark.parametrize("mode", ["max", "min"])
def test_nan_is_never_best_and_the_manifest_stays_json(tmp_path, mode):
    policy = RetentionPolicy(keep_last=1, keep_best=1, best_metric="val/loss", best_mode=mode)
    store = CheckpointStore(tmp_path / "exp", retention=policy)
    real_best = 0.9 if mode == "max" else 0.1
    commit(store, 1, {"val/loss": real_best})
    for epoch in (2, 3, 4):
        commit(store, epoch, {"val/loss": math.nan if epoch != 3 else math.inf})
    assert store.best("val/loss", mode).epoch == 1
    assert [r.epoch for r in store.list()] == [1, 4]
    assert math.isnan(store.list()[1].metrics["val/loss"])
    strict_json(store.manifest_path.read_text())
    for line in store.journal_path.read_text().splitlines():
        strict_json(line.split(" ", 1)[1])
    with store.lock():
        committed._CACHE.clear()
        store.rebuild()  # a rebuilt manifest holds the NaN of the files' meta as null too
    strict_json(store.manifest_path.read_text())


def test_a_torn_journal_line_is_ignored_by_readers_and_cut_by_the_next_run(tmp_path, capsys):
    store = CheckpointStore(tmp_path / "exp")
    refs = [commit(store, epoch) for epoch in (1, 2)]
    with open(store.journal_path, "ab") as handle:
        handle.write(b'0badc0de {"op":"commit","entry":{"seq":3,"pa')  # killed mid-append
    torn = store.journal_path.read_bytes()
    committed._CACHE.clear()  # as a new process would

    assert store.latest() == refs[1]
    assert main(["ckpt", "list", str(store.root)]) == 0
    assert store.journal_path.read_bytes() == torn  # a listing never repairs
    with store.lock():
        assert not store.journal_path.read_bytes().endswith(b'"pa')
        third = commit(store, 3)
    committed._CACHE.clear()
    assert store.list() == [*refs, third]


def test_a_journal_damaged_in_the_middle_is_rebuilt_from_the_files_under_the_lock(tmp_path):
    store = CheckpointStore(tmp_path / "exp")
    for epoch in (1, 2, 3):
        commit(store, epoch)
    lines = store.journal_path.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b'"epoch":1', b'"epoch":5')  # the checksum no longer matches
    store.journal_path.write_bytes(b"\n".join(lines))
    committed._CACHE.clear()
    assert store.latest().epoch == 3  # from the files, in memory
    assert not list(store.root.glob("*.corrupt-*"))
    with store.lock():
        pass
    assert list(store.root.glob("manifest.journal.corrupt-*"))
    committed._CACHE.clear()
    assert [r.epoch for r in store.list()] == [1, 2, 3]


def test_compaction_folds_the_journal_and_an_interrupted_one_loses_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "COMPACT_AFTER", 4)
    store = CheckpointStore(tmp_path / "exp")
    refs = [commit(store, epoch) for epoch in (1, 2)]  # 3 records: the lineage, 2 commits
    journal_before = store.journal_path.read_bytes()
    refs.append(commit(store, 3))  # the 4th record: folded into a new snapshot
    assert json.loads(store.manifest_path.read_text())["generation"] == 2
    assert len(store.journal_path.read_bytes().splitlines()) == 1  # its header only
    # a crash between the new snapshot and the new journal leaves the older journal
    store.journal_path.write_bytes(journal_before)
    committed._CACHE.clear()
    assert store.list() == refs
    with store.lock():
        assert commit(store, 4).epoch == 4
    committed._CACHE.clear()
    assert [r.epoch for r in store.list()] == [1, 2, 3, 4]


def test_a_commit_whose_compaction_fails_is_still_committed(tmp_path, monkeypatch):
    # the journal line is the commit; a snapshot that cannot be written (disk full) waits
    monkeypatch.setattr(manifest, "COMPACT_AFTER", 2)
    # one entry kept: the journal soon holds more records than the snapshot has entries
    store = CheckpointStore(tmp_path / "exp", retention=RetentionPolicy(keep_last=1))
    commit(store, 1)  # a new experiment's first snapshot and journal
    failed = []

    def full_disk(files, state):
        failed.append(state.records)
        raise CheckpointWriteError("could not write the snapshot: No space left on device")

    monkeypatch.setattr(committed, "compact", full_disk)
    refs = [commit(store, epoch) for epoch in (2, 3, 4)]
    assert failed  # compaction was due, and failed
    committed._CACHE.clear()
    assert store.list() == refs[-1:] and store.latest() == refs[-1]


def test_a_listing_during_rotation_reports_one_committed_state(tmp_path, monkeypatch):
    writer = CheckpointStore(tmp_path / "exp", retention=RetentionPolicy(keep_last=1))
    commit(writer, 1)
    commit(CheckpointStore(tmp_path / "exp"), 2)  # two entries; the next commit drops both
    lister = CheckpointStore(tmp_path / "exp")
    verify = lister._problem
    calls = []

    def commit_in_between(ref):
        if not calls:
            commit(writer, 3)  # a run commits and rotates while the listing verifies
        calls.append(ref)
        return verify(ref)

    monkeypatch.setattr(lister, "_problem", commit_in_between)
    report = lister.check()
    assert [(e.ref.epoch, e.problem) for e in report.entries] == [(3, None)]
    assert report.latest.epoch == 3


def test_a_manifest_from_a_newer_baton_is_left_alone(tmp_path):
    store = CheckpointStore(tmp_path / "exp")
    commit(store, 1)
    store.manifest_path.write_text(json.dumps({"version": 99, "checkpoints": []}))
    committed._CACHE.clear()
    with pytest.raises(ManifestVersionError, match="upgrade baton"):
        store.latest()
    assert json.loads(store.manifest_path.read_text())["version"] == 99


def test_commit_refuses_a_file_outside_the_experiment(tmp_path, outside):
    store = CheckpointStore(tmp_path / "exp")
    size, digest = io.sha256_of(str(outside))
    with pytest.raises(Exception, match="not inside"):
        store.commit(str(outside), epoch=1, iter=1, size=size, sha256=digest)


def _text(path: Path) -> Path:
    path.write_text("epoch: 3\n")
    return path


def _directory(path: Path) -> Path:
    path.mkdir()
    return path


def _garbage(path: Path) -> Path:
    path.write_bytes(b"\x00\xff\x13garbage")
    return path


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (_text, "a text file"),
        (_directory, "a directory"),
        (_garbage, "binary data"),
        (lambda _: Path("/dev/zero"), "a device or special file"),
    ],
    ids=["text", "directory", "garbage", "device"],
)
def test_ckpt_inspect_says_what_a_non_checkpoint_is(tmp_path, capsys, make, said):
    path = make(tmp_path / "thing")
    assert main(["ckpt", "inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert said in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_diverged_run_stops_clearly_and_keeps_its_checkpoints(tmp_path):
    from baton.config import load_config
    from baton.errors import TrainingDivergedError
    from baton.run import pipeline as pl

    cfg = load_config(
        {
            "experiment_name": "exp",
            "work_dir": str(tmp_path / "wd"),
            "randomness": {"seed": 3, "deterministic": True},
            "model": {"type": "MLP", "in_features": 8, "num_classes": 3, "hidden": [16]},
            "train_data": {"dataset": {"type": "SyntheticClassification"}, "batch_size": 32},
            "optim_wrapper": {"optimizer": {"type": "SGD", "lr": 100.0, "momentum": 0.9}},
            "train": {"max_epochs": 4},
            "checkpoint": {"keep_last": 2, "interval_iters": 2},
        }
    )
    with pytest.raises(TrainingDivergedError, match=r"train/loss=nan.*iter_000014\.pth"):
        pl.run(cfg)
    store = CheckpointStore(tmp_path / "wd" / "exp")
    report = store.check()
    assert report.entries and all(e.problem is None for e in report.entries)
    assert all(math.isfinite(v) for e in report.entries for v in e.ref.metrics.values())
    assert report.latest.iter == 14
    strict_json(store.manifest_path.read_text())


def test_a_full_disk_during_a_commit_records_nothing_and_leaves_no_torn_line(tmp_path):
    import resource
    import signal

    from baton import CheckpointWriteError

    store = CheckpointStore(tmp_path / "exp")
    first = commit(store, 1)
    path = store.target("epoch_0002.pth")
    size, digest = io.save({"meta": {"epoch": 2, "iter": 20}}, str(path))
    journal = store.journal_path.read_bytes()
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(journal) + 40, limits[1]))
    try:
        with pytest.raises(CheckpointWriteError, match="committed checkpoints are untouched"):
            store.commit(str(path), epoch=2, iter=20, size=size, sha256=digest)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    assert store.journal_path.read_bytes() == journal
    committed._CACHE.clear()
    assert store.list() == [first]
    assert store.commit(str(path), epoch=2, iter=20, size=size, sha256=digest).epoch == 2
