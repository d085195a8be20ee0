"""Contract 5: a run stopped anywhere and resumed ends bitwise equal to an uninterrupted one."""

import random

import numpy as np
import pytest
import torch
from torch import nn

from baton.run.loop import evaluate, train_epoch

from .helpers import EPOCH_LENGTH, assert_bitwise_equal, flat_state, make_loader, make_strategy, mlp

EPOCHS = 4

SGD = {
    "optim_wrapper": {"optimizer": {"type": "SGD", "lr": 0.05, "momentum": 0.9}},
    "param_scheduler": None,
}
ADAMW_WARMUP_COSINE_ACCUM = {
    "optim_wrapper": {
        "optimizer": {"type": "AdamW", "lr": 0.01, "weight_decay": 0.01},
        "accumulative_counts": 3,
        "clip_grad": {"max_norm": 1.0},
    },
    "param_scheduler": [
        {"type": "LinearLR", "start_factor": 0.1, "by_epoch": False, "begin": 0, "end": 5},
        {
            "type": "CosineAnnealingLR",
            "by_epoch": True,
            "begin": 0,
            "end": EPOCHS,
            "convert_to_iter_based": True,
        },
    ],
}


def prepared(work_dir, cfg):
    strategy = make_strategy(work_dir)
    strategy.prepare(
        mlp(),
        optim_wrapper=cfg["optim_wrapper"],
        param_scheduler=cfg["param_scheduler"],
        dispatch_kwargs={
            "max_epochs": EPOCHS,
            "max_iters": EPOCHS * EPOCH_LENGTH,
            "epoch_length": EPOCH_LENGTH,
        },
    )
    return strategy


def train_until(strategy, loader, *, max_iters):
    loss_fn = nn.CrossEntropyLoss()
    while strategy.iter < max_iters:
        train_epoch(strategy, loader, loss_fn=loss_fn, max_iters=max_iters)
        if strategy.step_in_epoch == 0:
            evaluate(strategy, make_loader(), loss_fn=loss_fn)


def scramble_global_rng():
    """What another job in the same process might do between save and resume."""
    torch.manual_seed(12345)
    random.seed(12345)
    np.random.seed(12345)
    torch.rand(100)


@pytest.mark.parametrize("cfg", [SGD, ADAMW_WARMUP_COSINE_ACCUM], ids=["sgd-momentum", "adamw"])
@pytest.mark.parametrize("stop_at", [2 * EPOCH_LENGTH, 2 * EPOCH_LENGTH + 3], ids=["epoch", "mid"])
def test_resumed_run_is_bitwise_equal_to_uninterrupted(tmp_path, cfg, stop_at):
    total = EPOCHS * EPOCH_LENGTH
    straight = prepared(tmp_path / "a", cfg)
    train_until(straight, make_loader(), max_iters=total)

    first = prepared(tmp_path / "b", cfg)
    train_until(first, make_loader(), max_iters=stop_at)
    ref = first.save_checkpoint(f"iter_{stop_at:06d}.pth")
    del first
    scramble_global_rng()

    second = prepared(tmp_path / "b", cfg)
    second.resume(ref.uri)
    assert (second.iter, second.step_in_epoch) == (stop_at, stop_at % EPOCH_LENGTH)
    train_until(second, make_loader(), max_iters=total)

    assert second.epoch == straight.epoch == EPOCHS
    assert_bitwise_equal(flat_state(straight), flat_state(second))
    assert second.optim_wrapper.get_lr() == straight.optim_wrapper.get_lr()
    schedulers = zip(
        getattr(straight, "param_schedulers", []),
        getattr(second, "param_schedulers", []),
        strict=True,
    )
    for a, b in schedulers:
        assert a.state_dict() == b.state_dict()


def test_without_rng_restore_the_runs_differ(tmp_path):
    """The test above can fail: dropping the RNG state breaks equality (dropout masks)."""
    total = EPOCHS * EPOCH_LENGTH
    straight = prepared(tmp_path / "a", SGD)
    train_until(straight, make_loader(), max_iters=total)

    first = prepared(tmp_path / "b", SGD)
    train_until(first, make_loader(), max_iters=2 * EPOCH_LENGTH)
    ref = first.save_checkpoint("epoch_0002.pth", callback=lambda c: c["meta"].pop("rng"))
    scramble_global_rng()
    second = prepared(tmp_path / "b", SGD)
    second.resume(ref.uri)
    train_until(second, make_loader(), max_iters=total)
    a, b = flat_state(straight), flat_state(second)
    assert any(not torch.equal(a[k], b[k]) for k in a)
