"""A folder named like a sharded checkpoint is untrusted input: a DCP metadata pickle that
names other classes or points outside its shards, a tensor claimed larger than its shards,
a huge metadata file, a FIFO or a link inside. Each is refused in one line, nothing run,
followed, waited on or allocated."""

import dataclasses
import os
import pickle
from pathlib import Path

import pytest
import torch

from baton.checkpoint import io, sharded
from baton.checkpoint.store import CheckpointStore
from baton.errors import CheckpointCorruptError, UnsafeCheckpointError
from baton.flows.cli import main

from ..baton.sharding import commit_sharded, link_a_shard, make_fifo, shard_of

pytestmark = pytest.mark.timeout(60)


class RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _metadata(folder: Path):
    """The folder's DCP metadata, read here with full unpickling (the test wrote it)."""
    return pickle.loads((folder / ".metadata").read_bytes())


def test_metadata_that_names_another_class_is_refused_unrun(tmp_path, capsys):
    store = CheckpointStore(tmp_path / "exp")
    ref = commit_sharded(store, 1)
    marker = tmp_path / "ran"
    (Path(ref.uri) / ".metadata").write_bytes(pickle.dumps(RunsACommand(marker)))

    with pytest.raises(
        UnsafeCheckpointError, match="refusing DCP metadata that names posix.system"
    ):
        io.load(ref.uri)
    assert main(["ckpt", "inspect", ref.uri]) == 1
    err = capsys.readouterr().err
    assert "refusing DCP metadata" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


@pytest.mark.parametrize(
    "place", ["/etc/hostname", "../../outside.distcp", "baton.pt"], ids=["absolute", "up", "ours"]
)
def test_metadata_that_points_outside_the_shards_is_refused(tmp_path, place):
    store = CheckpointStore(tmp_path / "exp")
    ref = commit_sharded(store, 1)
    (tmp_path / "outside.distcp").write_bytes(shard_of(Path(ref.uri)).read_bytes())
    metadata = _metadata(Path(ref.uri))
    metadata.storage_data = {
        index: dataclasses.replace(info, relative_path=place)
        for index, info in metadata.storage_data.items()
    }
    (Path(ref.uri) / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointCorruptError, match="not one of the checkpoint's shard files"):
        io.load(ref.uri)


def test_metadata_that_claims_more_than_the_shards_hold_is_refused_before_allocating(tmp_path):
    store = CheckpointStore(tmp_path / "exp")
    ref = commit_sharded(store, 1)
    metadata = _metadata(Path(ref.uri))
    info = metadata.state_dict_metadata["state_dict/weight"]
    info.size = torch.Size([10**6, 10**6])  # four terabytes of float32
    (Path(ref.uri) / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointCorruptError, match="claims 4,000,000,000,000 bytes"):
        io.load(ref.uri)


def test_metadata_with_a_range_past_its_shard_is_refused(tmp_path):
    store = CheckpointStore(tmp_path / "exp")
    ref = commit_sharded(store, 1)
    metadata = _metadata(Path(ref.uri))
    metadata.storage_data = {
        index: dataclasses.replace(info, length=10**12)
        for index, info in metadata.storage_data.items()
    }
    (Path(ref.uri) / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointCorruptError, match="the shard is truncated"):
        io.load(ref.uri)


def test_a_huge_metadata_or_skeleton_file_is_not_read(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path / "exp")
    ref = commit_sharded(store, 1)
    monkeypatch.setattr(sharded, "MAX_METADATA_BYTES", 64)
    with pytest.raises(CheckpointCorruptError, match="more than DCP metadata takes"):
        io.load(ref.uri)
    monkeypatch.setattr(sharded, "MAX_SKELETON_BYTES", 64)
    with pytest.raises(CheckpointCorruptError, match="non-tensor part takes"):
        io.load(ref.uri)


@pytest.mark.parametrize("damage", [make_fifo, link_a_shard], ids=["fifo", "link"])
def test_a_fifo_or_a_link_inside_is_never_opened(tmp_path, damage, capsys):
    store = CheckpointStore(tmp_path / "exp")
    ref = commit_sharded(store, 1)
    damage(Path(ref.uri))
    with pytest.raises(CheckpointCorruptError, match="not a regular file"):
        io.load(ref.uri)
    with pytest.raises(CheckpointCorruptError, match="not a regular file"):
        io.sha256_of(ref.uri)
    assert main(["ckpt", "inspect", ref.uri]) == 1
    err = capsys.readouterr().err
    assert "not a regular file" in err and len(err.strip().splitlines()) == 1


def test_metadata_with_odd_values_in_allowed_classes_is_refused(tmp_path, capsys):
    store = CheckpointStore(tmp_path / "exp")
    ref = commit_sharded(store, 1)
    metadata = _metadata(Path(ref.uri))
    metadata.state_dict_metadata["state_dict/weight"].size = ["3", "4"]
    (Path(ref.uri) / ".metadata").write_bytes(pickle.dumps(metadata))
    assert main(["ckpt", "inspect", ref.uri]) == 1
    err = capsys.readouterr().err
    assert "gives the shape ['3', '4']" in err and len(err.strip().splitlines()) == 1

    metadata.storage_data = {"state_dict/weight": "__0_0.distcp"}
    (Path(ref.uri) / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointCorruptError, match="is not DCP metadata"):
        io.load(ref.uri)


def test_a_skeleton_that_names_a_tensor_oddly_is_refused(tmp_path):
    store = CheckpointStore(tmp_path / "exp")
    ref = commit_sharded(store, 1)
    io.save({"state_dict": {"__dcp_tensor__": [1]}}, str(Path(ref.uri) / sharded.SKELETON_FILE))
    with pytest.raises(CheckpointCorruptError, match="names a tensor by"):
        io.load(ref.uri)
