"""Exactness beyond the weights: running metrics, background writers, horizons, RNGs."""

import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch

from baton.checkpoint import background
from baton.run import pipeline as pl

from . import noisy
from .helpers import assert_bitwise_equal
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


def test_a_killed_background_writer_leaves_no_temporary_and_no_gap_in_the_history(
    tmp_path, caplog, monkeypatch
):
    monkeypatch.setattr(background, "COPY_BELOW_BYTES", -1)  # a state written by a child
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


class _Pinger:
    """A thread that draws from ``random`` as Prefect's websocket client does for its pings
    (``random.getrandbits(32)``), once at every training forward: the forward waits for it."""

    def __init__(self) -> None:
        self._go, self._done = threading.Semaphore(0), threading.Semaphore(0)
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            self._go.acquire()
            if self._stop:
                return
            random.getrandbits(32)
            self._done.release()

    def ping(self) -> None:
        self._go.release()
        self._done.acquire()

    def close(self) -> None:
        self._stop = True
        self._go.release()
        self._thread.join()


def _global_draws() -> None:
    """What other code of the process does between two steps of a run."""
    random.random()
    np.random.rand(3)
    torch.rand(3)


def _noisy_config(tmp_path, *overrides):
    return cfg_for(
        tmp_path,
        "checkpoint.interval_iters=3",
        *overrides,
        model={"type": "tests.baton.noisy.PingedMLP", "in_features": 8, "num_classes": 3},
        train_data={"dataset": {"type": "tests.baton.noisy.AugmentedSynthetic"}, "batch_size": 32},
    )


def _weights(p) -> dict:
    return {k: v.clone() for k, v in p.strategy.model.state_dict().items()}


def test_other_threads_and_code_between_steps_do_not_change_a_run(tmp_path, monkeypatch):
    monkeypatch.setenv("BATON_ALLOWED_MODULES", "tests")
    quiet = pl.build_pipeline(_noisy_config(tmp_path / "quiet"))
    for _ in range(2):
        pl.train_one_epoch(quiet)

    pinger = _Pinger()
    monkeypatch.setattr(noisy, "ON_FORWARD", pinger.ping)
    try:
        busy = pl.build_pipeline(_noisy_config(tmp_path / "busy"))
        for _ in range(2):
            _global_draws()
            pl.train_one_epoch(busy)

        # Killed inside epoch 2 (after the iteration checkpoint at 12), then run again.
        first = pl.build_pipeline(_noisy_config(tmp_path / "killed"))
        pl.train_one_epoch(first)
        _global_draws()
        pl.train_one_epoch(first, stop_at=13)
        del first
        _global_draws()
        rerun = pl.build_pipeline(_noisy_config(tmp_path / "killed"))
        latest = rerun.strategy.checkpoints.latest()
        assert latest.iter == 12
        pl.resume(rerun, latest)
        _global_draws()
        pl.train_one_epoch(rerun)
    finally:
        pinger.close()
    assert_bitwise_equal(_weights(quiet), _weights(busy))
    assert_bitwise_equal(_weights(quiet), _weights(rerun))


def test_a_run_leaves_the_process_generators_as_they_were(tmp_path):
    random.seed(1)
    expected = random.random()
    random.seed(1)
    p = pl.build_pipeline(cfg_for(tmp_path))
    pl.train_one_epoch(p)
    assert random.random() == expected


def test_a_process_forked_while_another_thread_draws_can_still_train(tmp_path):
    # Another thread drawing from `random` holds the generators' claim for a moment on
    # every draw; a fork (the flow's training process) copies the claim as it is, held
    # by a thread the child does not have. The child must still run its steps.
    pipeline = pl.build_pipeline(cfg_for(tmp_path))  # routes `random` through the claim
    stop = threading.Event()

    def draws() -> None:
        while not stop.is_set():
            random.getrandbits(32)

    thread = threading.Thread(target=draws, daemon=True)
    thread.start()
    stuck = 0
    try:
        for _ in range(60):
            pid = os.fork()
            if pid == 0:  # a step's claim, bounded: a held lock would block it for good
                code = 1
                try:
                    code = 0 if _enters_a_step(pipeline, within_s=5) else 3
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            stuck += os.waitstatus_to_exitcode(status) != 0
            if stuck:
                break
    finally:
        stop.set()
        thread.join()
    assert stuck == 0


def _enters_a_step(pipeline, within_s: float) -> bool:
    """Whether a step of ``pipeline`` (its generators' claim) begins within ``within_s``
    (tried from a thread: a claim that is never released blocks it for good)."""
    entered = threading.Event()

    def step() -> None:
        with pipeline.rng.active():
            entered.set()

    threading.Thread(target=step, daemon=True).start()
    return entered.wait(within_s)
