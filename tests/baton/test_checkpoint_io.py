"""Contract 3 and 4: safe loading, atomic verified writes, the experiment's store."""

import multiprocessing
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from baton import (
    CheckpointCorruptError,
    CheckpointName,
    CheckpointNotFoundError,
    CheckpointRef,
    CheckpointStore,
    ExperimentLockedError,
    RetentionPolicy,
    UnsafeCheckpointError,
    trusted_loading,
)
from baton.checkpoint import io


class _RunsCode:
    """Unpickling this writes a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "payload": _RunsCode(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="Nothing from the file was run") as info:
        io.load(str(path))
    assert "trusted_loading" in str(info.value)
    assert not marker.exists()


def test_malicious_legacy_pickle_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil_legacy.pth"
    path.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises((UnsafeCheckpointError, CheckpointCorruptError)):
        io.load(str(path))
    assert not marker.exists()


def test_trusted_loading_is_an_explicit_opt_in(tmp_path):
    path = tmp_path / "custom.pth"
    torch.save({"when": time.struct_time((2020, 1, 1, 0, 0, 0, 0, 1, 0))}, path)
    with pytest.raises(UnsafeCheckpointError):
        io.load(str(path))
    with trusted_loading():
        assert io.load(str(path))["when"].tm_year == 2020
    with pytest.raises(UnsafeCheckpointError):
        io.load(str(path))


def test_atomic_save_and_hash_while_writing(tmp_path):
    import hashlib

    target = tmp_path / "deep" / "dir" / "c.pth"
    size, digest = io.save({"w": torch.arange(10)}, str(target))
    data = target.read_bytes()
    assert size == len(data) and digest == hashlib.sha256(data).hexdigest()
    assert [p.name for p in target.parent.iterdir()] == ["c.pth"]  # no temp file left


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "c.pth"
    io.save({"version": 1}, str(target))
    before = target.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom in the middle of the write")

    with pytest.raises(RuntimeError, match="boom"):
        io.save({"big": torch.zeros(1000), "bad": Unpicklable()}, str(target))
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pth"]


def _write_forever(path):
    io.save({"w": torch.zeros(50_000_000)}, path)


def test_killed_writer_leaves_the_previous_checkpoint(tmp_path):
    target = tmp_path / "c.pth"
    io.save({"version": 1}, str(target))
    before = target.read_bytes()
    process = multiprocessing.get_context("spawn").Process(
        target=_write_forever, args=(str(target),)
    )
    process.start()
    deadline = time.time() + 30
    while time.time() < deadline and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):
        time.sleep(0.01)
    process.kill()
    process.join()
    assert target.read_bytes() == before
    assert io.load(str(target)) == {"version": 1}


def test_truncated_and_flipped_files_are_reported(tmp_path):
    path = tmp_path / "c.pth"
    io.save({"w": torch.arange(1000.0)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointCorruptError, match="truncated or damaged"):
        io.load(str(path))
    path.write_bytes(b"\0" * len(data))
    with pytest.raises(CheckpointCorruptError):
        io.load(str(path))


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        io.load(str(tmp_path / "none.pth"))


def test_ref_round_trips_through_json():
    ref = CheckpointRef(
        uri="/x/epoch_0001.pth", epoch=1, iter=10, size=5, sha256="a" * 64, metrics={"acc": 0.5}
    )
    assert CheckpointRef.from_json(ref.to_json()) == ref
    with pytest.raises(Exception, match="frozen"):
        ref.epoch = 2


def test_names_format_parse_and_order():
    assert str(CheckpointName.for_epoch(3)) == "epoch_0003.pth"
    assert str(CheckpointName.for_iter(120)) == "iter_000120.pth"
    assert CheckpointName.parse("epoch_0003.pth") == CheckpointName("epoch", 3)
    assert CheckpointName.parse("latest.pth") is None
    assert sorted([CheckpointName.for_epoch(10), CheckpointName.for_epoch(2)])[0].number == 2


def _commit(store, epoch, metrics=None, payload=None):
    path = store.path_for(CheckpointName.for_epoch(epoch))
    size, digest = io.save(payload or {"epoch": epoch}, str(path))
    return store.commit(
        str(path), epoch=epoch, iter=epoch * 10, size=size, sha256=digest, metrics=metrics
    )


def test_store_latest_skips_corrupt_and_missing(tmp_path, caplog):
    store = CheckpointStore(tmp_path / "exp")
    assert store.latest() is None
    refs = [_commit(store, e) for e in (1, 2, 3, 4)]
    assert store.latest() == refs[3]
    # flip one byte of epoch 4, truncate epoch 3, delete epoch 2
    flipped = Path(refs[3].uri)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    os.truncate(refs[2].uri, 10)
    os.unlink(refs[1].uri)
    assert store.latest() == refs[0]
    assert "does not match its manifest entry" in caplog.text
    assert "truncated or overwritten" in caplog.text


def test_a_file_not_in_the_manifest_does_not_exist(tmp_path):
    store = CheckpointStore(tmp_path / "exp")
    ref = _commit(store, 1)
    io.save({"epoch": 2}, str(store.path_for("epoch_0002.pth")))  # written, never committed
    assert store.latest() == ref


def test_rotation_keeps_last_and_best(tmp_path):
    store = CheckpointStore(
        tmp_path / "exp",
        retention=RetentionPolicy(keep_last=2, keep_best=1, best_metric="acc", best_mode="max"),
    )
    accs = {1: 0.5, 2: 0.9, 3: 0.6, 4: 0.7, 5: 0.65}
    for epoch, acc in accs.items():
        _commit(store, epoch, {"acc": acc})
    kept = sorted(r.epoch for r in store.list())
    assert kept == [2, 4, 5]
    files = sorted(p.name for p in store.checkpoint_dir.iterdir())
    assert files == ["epoch_0002.pth", "epoch_0004.pth", "epoch_0005.pth"]
    assert store.best("acc").epoch == 2


def test_rotation_policy_validation():
    with pytest.raises(ValueError, match="keep_best needs best_metric"):
        RetentionPolicy(keep_last=1, keep_best=2)
    with pytest.raises(ValueError, match="keep_last must be at least 1"):
        RetentionPolicy(keep_last=0)


@pytest.mark.parametrize(
    "damage",
    ["{not json", "", '{"checkpoints": 3}', '{"checkpoints": [{"uri": 1}]}'],
    ids=["garbage", "empty", "not-a-list", "bad-entry"],
)
def test_corrupt_manifest_is_rebuilt_from_the_files_that_verify(tmp_path, caplog, damage):
    store = CheckpointStore(tmp_path / "exp")
    strategy_meta = {"meta": {"epoch": 0, "iter": 0}}
    _commit(
        store,
        1,
        payload={**strategy_meta, "meta": {"epoch": 1, "iter": 10, "metrics": {"acc": 0.5}}},
    )
    _commit(store, 2, payload={"meta": {"epoch": 2, "iter": 20}})
    store.path_for("epoch_0003.pth").write_bytes(b"half a checkpoint")  # never committed, broken
    store.manifest_path.write_text(damage)
    with store.lock():  # repairs are written by runs holding the lock
        latest = store.latest()
    assert (latest.epoch, latest.iter) == (2, 20)
    assert [r.epoch for r in store.list()] == [1, 2]
    assert store.list()[0].metrics == {"acc": 0.5}
    assert "rebuilding it from the checkpoint files" in caplog.text
    assert "not taking epoch_0003.pth" in caplog.text
    assert list(store.root.glob("manifest.json.corrupt-*"))


def test_swapped_files_are_detected(tmp_path):
    store = CheckpointStore(tmp_path / "exp")
    first, second = _commit(store, 1), _commit(store, 2)
    a, b = Path(first.uri), Path(second.uri)
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    assert store.latest() is None  # neither matches its own entry


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path):
    import resource
    import signal

    from baton import CheckpointWriteError

    store = CheckpointStore(tmp_path / "exp")
    ref = _commit(store, 1)
    manifest = store.manifest_path.read_text()
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, limits[1]))
    try:
        with pytest.raises(CheckpointWriteError, match="File too large.*previous checkpoints"):
            io.save({"w": torch.zeros(1_000_000)}, str(store.path_for("epoch_0002.pth")))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    assert store.manifest_path.read_text() == manifest
    assert store.latest() == ref
    assert sorted(p.name for p in store.checkpoint_dir.iterdir()) == ["epoch_0001.pth"]


def test_a_file_from_a_newer_format_is_refused(tmp_path):
    from baton import CheckpointError
    from baton.checkpoint.format import split_weights

    with pytest.raises(CheckpointError, match="format 2.*Upgrade baton"):
        split_weights({"meta": {"format": 2, "baton": "9.0"}, "state_dict": {}}, "future.pth")


def test_lock_excludes_a_second_process(tmp_path):
    store = CheckpointStore(tmp_path / "exp")
    code = (
        "import sys; from baton import CheckpointStore, ExperimentLockedError\n"
        f"store = CheckpointStore({str(tmp_path / 'exp')!r})\n"
        "try:\n"
        "    with store.lock():\n"
        "        print('got it')\n"
        "except ExperimentLockedError as err:\n"
        "    print('locked:', err)\n"
    )
    with store.lock():
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        assert "locked:" in out.stdout and f"pid {os.getpid()}" in out.stdout
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "got it" in out.stdout
    # a second holder in the same process also conflicts (separate open file)
    with (
        store.lock(),
        pytest.raises(ExperimentLockedError, match="is being trained by"),
        CheckpointStore(tmp_path / "exp").lock(),
    ):
        pass


def test_taking_the_lock_removes_what_killed_writers_left(tmp_path):
    store = CheckpointStore(tmp_path / "exp")
    ref = _commit(store, 1)
    stale = [
        store.checkpoint_dir / ".epoch_0002.pth.x1y2.tmp",
        store.root / ".manifest.json.k3.tmp",
    ]
    for path in stale:
        path.write_bytes(b"half")
    with store.lock():
        assert not any(path.exists() for path in stale)
    assert store.latest() == ref


def test_expected_bytes_hold_for_the_file_a_scheme_loads(tmp_path, monkeypatch):
    # a scheme's loader opens another file (a download cache): the bytes it parses are
    # checked all the same, so a stale or swapped cache is refused
    from baton.checkpoint import loaders

    cached = tmp_path / "cache.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}}, cached)
    size, digest = io.sha256_of(str(cached))
    monkeypatch.setitem(loaders._SCHEMES, "cache://", lambda uri, loc: io.load(str(cached)))
    with io.expect_bytes("cache://model", size, digest):
        assert "state_dict" in loaders.load_uri("cache://model")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, cached)  # the cache now holds others
    with (
        io.expect_bytes("cache://model", size, digest),
        pytest.raises(CheckpointCorruptError, match="loaded from"),
    ):
        loaders.load_uri("cache://model")
