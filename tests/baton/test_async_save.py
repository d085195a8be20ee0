"""Background saves: training waits only for a snapshot; the file holds the state at the
call; the manifest learns of it only once it is complete."""

import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
from collections import OrderedDict, defaultdict, namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from baton import CheckpointError
from baton.checkpoint import background
from baton.config import load_config
from baton.run import pipeline as pl

from ..processes import children, wait_gone
from .helpers import assert_bitwise_equal, make_strategy
from .test_config import base
from .test_pipeline import cfg_for


def prepared(work_dir):
    strategy = make_strategy(work_dir)
    strategy.prepare(
        nn.Linear(64, 64), optim_wrapper={"optimizer": {"type": "SGD", "lr": 0.5, "momentum": 0.9}}
    )
    return strategy


def step(strategy):
    strategy.model(torch.randn(8, 64)).pow(2).mean().backward()
    strategy.optim_wrapper.step()
    strategy.optim_wrapper.zero_grad()


@pytest.fixture(params=["copy", "fork"])
def writer(request, monkeypatch):
    """Each way a background save is written: a thread writing a copy (a state up to
    ``COPY_BELOW_BYTES``) or a forked child (a larger one)."""
    if request.param == "fork":
        monkeypatch.setattr(background, "COPY_BELOW_BYTES", -1)
    else:
        monkeypatch.setattr(background, "_save_in_child", _no_fork)
    return request.param


def _no_fork(obj, uri):
    raise AssertionError("a small state was written by a forked child")


def test_file_holds_the_state_at_the_call_while_training_goes_on(work_dir, writer, monkeypatch):
    strategy = prepared(work_dir)
    step(strategy)
    expected = {k: v.clone() for k, v in strategy.model.state_dict().items()}
    momentum = [
        s["momentum_buffer"].clone() for s in strategy.optim_wrapper.optimizer.state.values()
    ]
    trained = threading.Event()
    if writer == "copy":  # the thread writes only once training has changed everything
        write = background.save
        monkeypatch.setattr(background, "save", lambda o, u: trained.wait(60) and write(o, u))
    future = strategy.save_checkpoint_async("epoch_0001.pth")
    for _ in range(20):  # change every weight while the writer writes
        step(strategy)
    trained.set()
    ref = future.result()
    saved = torch.load(ref.uri, weights_only=True)
    assert all(torch.equal(saved["state_dict"][k], expected[k]) for k in expected)
    buffers = [s["momentum_buffer"] for s in saved["optimizer"]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(buffers, momentum, strict=True))
    assert not torch.equal(strategy.model.weight, expected["weight"])
    assert strategy.checkpoints.latest() == ref


def test_a_run_resumed_from_a_background_save_equals_an_uninterrupted_one(tmp_path, writer):
    cfg = cfg_for(tmp_path, "train.max_epochs=4", "checkpoint.async_save=true")
    straight, _ = pl.run(cfg_for(tmp_path / "straight", "train.max_epochs=4"))
    first = pl.build_pipeline(cfg)
    pl.save(first, pl.train_one_epoch(first))
    writing = pl.save(first, pl.train_one_epoch(first), background=True)
    pl.train_one_epoch(first)  # training goes on while the epoch-2 checkpoint is written
    ref = writing.result()
    assert ref.epoch == 2
    second = pl.build_pipeline(cfg)
    pl.resume(second, ref)
    pl.train_one_epoch(second)
    pl.train_one_epoch(second)
    assert_bitwise_equal(second.strategy.model.state_dict(), straight.strategy.model.state_dict())
    assert str(second.strategy.optim_wrapper.state_dict()) == str(
        straight.strategy.optim_wrapper.state_dict()
    )


def test_one_save_at_a_time_and_sync_save_waits(work_dir):
    strategy = prepared(work_dir)
    first = strategy.save_checkpoint_async("epoch_0001.pth")
    second = strategy.save_checkpoint_async("epoch_0002.pth")
    assert first.done()  # the second call waited for the first
    third = strategy.save_checkpoint("epoch_0003.pth")
    assert second.done()
    assert [r.uri for r in strategy.checkpoints.list()] == [
        first.result().uri,
        second.result().uri,
        third.uri,
    ]


def test_a_failed_background_write_commits_nothing(work_dir, tmp_path, caplog, writer):
    strategy = prepared(work_dir)
    ref = strategy.save_checkpoint("epoch_0001.pth")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a folder should be")
    future = strategy.save_checkpoint_async(str(blocker / "epoch_0002.pth"))
    with pytest.raises(CheckpointError, match="background save .* failed"):
        future.result()
    assert strategy.checkpoints.latest() == ref
    # The next save (or an explicit wait) reports it, and goes on: the state is still live.
    assert strategy.wait_for_checkpoints() is None
    assert "not-a-dir" in caplog.text and "nothing was committed" in caplog.text
    assert strategy.wait_for_checkpoints() is None


def test_a_small_state_is_copied_a_large_one_forked(work_dir, monkeypatch):
    strategy = prepared(work_dir)  # 33 KB of weights and momentum
    forks = []
    real = background._save_in_child
    monkeypatch.setattr(background, "_save_in_child", lambda o, u: forks.append(u) or real(o, u))
    strategy.save_checkpoint_async("epoch_0001.pth").result()
    assert forks == []
    monkeypatch.setattr(background, "COPY_BELOW_BYTES", 16 * 1024)
    strategy.save_checkpoint_async("epoch_0002.pth").result()
    assert [Path(u).name for u in forks] == ["epoch_0002.pth"]


def test_the_copy_is_written_as_torch_save_writes_the_state():
    tied = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    tied[1].weight = tied[0].weight
    base = torch.arange(10.0)
    array, shared = np.arange(4.0), [1, 2]
    state = {
        "model": tied.state_dict(),
        "whole": base,
        "window": base[2:5],
        "sparse": base.to_sparse(),
        "conjugate": torch.tensor([1 + 2j]).conj(),
        "negative": torch.tensor([1 + 2j]).conj().imag,
        "parameter": nn.Parameter(torch.ones(2)),
        "leaf": torch.ones(2, requires_grad=True),
        # two storages at one address: torch.save writes both
        "head": torch.from_numpy(array[:2]),
        "array": torch.from_numpy(array),
        "once": shared,
        "twice": shared,
    }
    copied = background._snapshot(state)
    base[3] = 100.0
    array[0] = -1.0

    written = torch_saved(copied)
    # one storage for the tied pair, as before the copy
    assert len(torch_saved(copied["model"])) == len(torch_saved(state["model"]))
    loaded = torch.load(io.BytesIO(written), weights_only=True)
    first, second = loaded["model"]["0.weight"], loaded["model"]["1.weight"]
    assert first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
    assert loaded["window"].tolist() == [2.0, 3.0, 4.0]
    assert (
        loaded["window"].untyped_storage().data_ptr()
        == loaded["whole"].untyped_storage().data_ptr()
    )
    assert loaded["sparse"].to_dense()[3] == 3.0
    assert loaded["conjugate"].tolist() == [1 - 2j] and loaded["negative"].tolist() == [-2.0]
    assert isinstance(loaded["parameter"], nn.Parameter) and loaded["parameter"].requires_grad
    assert loaded["leaf"].requires_grad
    assert loaded["head"].tolist() == [0.0, 1.0] and loaded["array"].tolist() == [
        0.0,
        1.0,
        2.0,
        3.0,
    ]
    assert loaded["once"] is loaded["twice"]


class _RefusesACopy:
    """Pickled as usual; copying it fails (as for an object holding a non-leaf tensor)."""

    def __deepcopy__(self, memo):
        raise RuntimeError("cannot be copied")


def test_a_state_that_cannot_be_copied_is_written_by_a_child(work_dir, monkeypatch):
    forks = []
    real = background._save_in_child
    monkeypatch.setattr(background, "_save_in_child", lambda o, u: forks.append(u) or real(o, u))
    target = str(work_dir / "odd.pth")
    obj = {"weights": torch.ones(2), "odd": _RefusesACopy()}
    size, digest = background.save_in_background(obj, target).result()
    assert forks == [target] and size == os.path.getsize(target) and len(digest) == 64


def torch_saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_the_copy_is_one_training_cannot_change():
    weights = OrderedDict(w=torch.ones(3))
    weights._metadata = {"": {"version": 1}}  # what a module's state dict carries
    Pair = namedtuple("Pair", "a b")
    state = {
        "state_dict": weights,
        "pair": Pair(torch.zeros(2), [1, 2]),
        "counts": defaultdict(int, seen=1),
        "array": np.arange(3),
        "name": "epoch",
    }
    copied = background._snapshot(state)
    weights["w"].add_(1)
    state["pair"].b.append(3)
    state["counts"]["seen"] += 1
    state["array"][0] = 7
    assert torch.equal(copied["state_dict"]["w"], torch.ones(3))
    assert copied["state_dict"]._metadata == {"": {"version": 1}}
    assert isinstance(copied["pair"], Pair) and copied["pair"].b == [1, 2]
    assert isinstance(copied["counts"], defaultdict) and copied["counts"]["seen"] == 1
    assert copied["array"].tolist() == [0, 1, 2]


def test_pipeline_with_async_saves_ends_equal_to_sync_saves(tmp_path, writer):
    def run(name, async_save):
        data = base()
        data.update(work_dir=str(tmp_path / name))
        data["model"]["dropout"] = 0.2
        cfg = load_config(data, {"train.max_epochs": 4, "checkpoint.async_save": async_save})
        pipeline, ref = pl.run(cfg)
        return pipeline, torch.load(ref.uri, weights_only=True)

    _, sync_ckpt = run("sync", False)
    async_pipeline, async_ckpt = run("async", True)
    for key, value in sync_ckpt["state_dict"].items():
        assert torch.equal(async_ckpt["state_dict"][key], value)
    assert [r.epoch for r in async_pipeline.strategy.checkpoints.list()] == [2, 3, 4]  # keep_last 3
    assert sync_ckpt["meta"]["iter"] == async_ckpt["meta"]["iter"]


SLOW_DISK = """
import sys, threading, time
from baton.checkpoint import background
background.save = lambda obj, uri: time.sleep(120)  # a disk that does not finish
save = lambda: background._save_in_child({"weights": 1}, sys.argv[1])
if sys.argv[2] == "thread":  # forked from a thread that ends: the kernel's signal cannot serve
    forker = threading.Thread(target=save)
    forker.start()
    forker.join()
else:
    save()
print("writing", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize(
    ("forked_from", "signum"),
    [("main", signal.SIGKILL), ("main", signal.SIGTERM), ("thread", signal.SIGKILL)],
)
def test_a_writer_ends_with_the_process_that_forked_it(tmp_path, forked_from, signum):
    # The OOM killer ends a training process mid-save: nobody is left to commit the
    # write, and the writer must not live on alone.
    trainer = subprocess.Popen(
        [sys.executable, "-c", SLOW_DISK, str(tmp_path / "epoch_0001.pth"), forked_from],
        stdout=subprocess.PIPE,
        text=True,
    )
    writers: list[int] = []
    try:
        assert trainer.stdout.readline().strip() == "writing"
        writers = children(trainer.pid)
        assert len(writers) == 1
        trainer.send_signal(signum)
        trainer.wait(10)
        assert not wait_gone(writers, timeout=10), "the writer outlived the process that forked it"
    finally:
        trainer.kill()
        trainer.wait()
        for writer in writers:  # one that outlived it (the failure above) ends here
            with contextlib.suppress(ProcessLookupError):
                os.kill(writer, signal.SIGKILL)
