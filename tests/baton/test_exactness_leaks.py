"""Exactness beyond the weights: running metrics, background writers, horizons, RNGs."""

import os
import signal
import time
from pathlib import Path

import torch

from baton import pipeline as pl

from .test_pipeline import cfg_for


def test_train_metrics_of_an_epoch_resumed_half_way_cover_the_whole_epoch(tmp_path):
    cfg = cfg_for(tmp_path, "checkpoint.interval_iters=3", "checkpoint.keep_last=null")
    straight = pl.build_pipeline(cfg_for(tmp_path / "straight"))
    pl.train_one_epoch(straight)
    expected = pl.train_one_epoch(straight)

    first = pl.build_pipeline(cfg)
    pl.train_one_epoch(first)
    pl.train_one_epoch(first, stop_at=12)  # iteration checkpoints at 9 and 12, in epoch 2
    latest = first.strategy.checkpoints.latest()
    assert (latest.iter, first.strategy.step_in_epoch) == (12, 4)

    second = pl.build_pipeline(cfg)
    pl.resume(second, latest)
    assert pl.train_one_epoch(second) == expected


class _StallsTheWriter:
    """Pickling it (inside the writer process, mid-write) records the writer's pid and
    waits to be killed: a writer stopped at a known point, deterministically."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __deepcopy__(self, memo):
        return self  # the checkpoint dict is copied in the training process: not here

    def __reduce__(self):
        self.marker.write_text(str(os.getpid()))
        while True:
            time.sleep(1)


def _kill_the_writer(marker: Path) -> None:
    deadline = time.monotonic() + 120
    while not (marker.exists() and marker.read_text()):
        assert time.monotonic() < deadline, "the writer never started"
        time.sleep(0.01)
    os.kill(int(marker.read_text()), signal.SIGKILL)


def test_a_killed_background_writer_leaves_no_temporary_and_no_gap_in_the_history(tmp_path, caplog):
    p = pl.build_pipeline(cfg_for(tmp_path, "train.max_epochs=3", "checkpoint.async_save=true"))
    folder = p.strategy.checkpoints.checkpoint_dir
    pl.save(p, pl.train_one_epoch(p))
    metrics = pl.train_one_epoch(p)
    marker = tmp_path / "writer.pid"
    writing = pl.save(p, {**metrics, "stall": _StallsTheWriter(marker)}, background=True)
    _kill_the_writer(marker)
    assert "killed by signal 9" in str(writing.exception())
    assert not [f.name for f in folder.iterdir() if f.name.endswith(".tmp")]
    p.history[-1].pop("stall")

    ref = pl.save(p, pl.train_one_epoch(p))  # the next save goes on, and holds epoch 2
    assert "epoch_0002.pth" in caplog.text and "nothing was committed" in caplog.text
    assert [r.epoch for r in p.strategy.checkpoints.list()] == [1, 3]
    history = torch.load(ref.uri, weights_only=True)["meta"]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[1]["train/loss"] == metrics["train/loss"]
