"""Sharded checkpoints made in one process (no process group), for the store's tests and
the security tests: a tiny nn.Linear's checkpoint written through DCP, published and
committed as a distributed save does."""

import os
from pathlib import Path

import torch
from torch import nn

from baton.checkpoint import io, sharded
from baton.checkpoint.ref import CheckpointRef
from baton.checkpoint.store import CheckpointStore


def checkpoint_dict(seed: int = 0, **meta) -> dict:
    """What a strategy saves for a tiny nn.Linear with SGD momentum (one step taken)."""
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return {
        "meta": {"epoch": 1, "iter": 10, "seed": seed, "rng": {"torch": torch.get_rng_state()}}
        | meta,
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "param_schedulers": [{"base_lrs": [0.1], "last_epoch": 1}],
    }


def save_skeleton(skeleton: dict, path: Path) -> None:
    io.save(skeleton, str(path))


def commit_sharded(
    store: CheckpointStore, epoch: int, checkpoint: dict | None = None, **metrics
) -> CheckpointRef:
    """Write, publish and commit a sharded checkpoint in this process (no process group)."""
    checkpoint = checkpoint or checkpoint_dict(epoch)
    target = store.target(f"epoch_{epoch:04d}.dcp")
    sharded.write(checkpoint, sharded.writing_folder(target), save_skeleton=save_skeleton)
    size, sha = sharded.publish(sharded.writing_folder(target), target)
    return store.commit(
        str(target), epoch=epoch, iter=epoch * 10, size=size, sha256=sha, metrics=metrics
    )


def commit_file(store: CheckpointStore, epoch: int) -> CheckpointRef:
    target = store.target(f"epoch_{epoch:04d}.pth")
    size, sha = io.save(checkpoint_dict(epoch), str(target))
    return store.commit(str(target), epoch=epoch, iter=epoch * 10, size=size, sha256=sha)


def assert_same(a, b) -> None:
    """Two loaded checkpoints are equal: same structure, same types, bitwise tensors."""
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def shard_of(folder: Path) -> Path:
    (shard,) = folder.glob("__*_0.distcp")
    return shard


def make_fifo(folder: Path) -> None:
    """A FIFO among the shards: whoever opens it to read waits for a writer."""
    os.mkfifo(folder / "__1_0.distcp")


def link_a_shard(folder: Path) -> None:
    """A shard replaced by a link to the same bytes elsewhere."""
    shard = shard_of(folder)
    outside = folder.parent.parent / "kept-elsewhere.distcp"
    shard.rename(outside)
    shard.symlink_to(outside)
