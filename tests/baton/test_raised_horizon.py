"""A raised horizon continues exactly, or is refused without a fork.

Each scheduler kind baton ships is run to a first horizon, then continued to a larger one
by a freshly built pipeline (as a new process would), and compared bitwise with a run
trained to the larger horizon from the start. A scheduler whose curve is stretched by
the horizon (``T_max``, ``total_steps`` or ``end`` left to default) cannot continue
exactly: the resume is refused, naming it and the fork, and changes nothing.
"""

import copy
from pathlib import Path

import pytest
import torch

from baton import ResumeConfigError
from baton.config import validate
from baton.run import pipeline as pl
from tests.flows.helpers import assert_same_training_result

from .helpers import HALVING_PLATEAU, small_pipeline

EPOCHS = {"max_epochs": 3}, {"max_epochs": 6}
# 20 stops inside epoch 3 (8 iterations per epoch); 44 inside epoch 6.
ITERS = {"max_iters": 20}, {"max_iters": 44}

# Schedules that do not depend on the horizon but whose window ``end`` defaulted to it
# (and two given explicitly): each continues exactly. Milestone 3 falls on the first
# horizon, where the first run's scheduler stopped.
EXACT = {
    "step": ([{"type": "StepLR", "step_size": 2, "gamma": 0.5}], EPOCHS),
    "multistep": ([{"type": "MultiStepLR", "milestones": [3, 5], "gamma": 0.5}], EPOCHS),
    "exponential": ([{"type": "ExponentialLR", "gamma": 0.8}], EPOCHS),
    "cosine-given-T_max": ([{"type": "CosineAnnealingLR", "T_max": 4}], EPOCHS),
    "one-cycle-given-total_steps": (
        [{"type": "OneCycleLR", "eta_max": 0.1, "total_steps": 6}],
        EPOCHS,
    ),
    "cosine-restarts": (
        [
            {
                "type": "CosineRestartLR",
                "periods": [2, 4],
                "restart_weights": [1.0, 0.5],
                "eta_min": 0.001,
            }
        ],
        EPOCHS,
    ),
    "plateau": ([HALVING_PLATEAU], EPOCHS),
    "poly-given-end": ([{"type": "PolyLR", "power": 2.0, "end": 5}], EPOCHS),
    "warmup-then-multistep": (
        [
            {"type": "LinearLR", "start_factor": 0.5, "end": 2},
            {"type": "MultiStepLR", "milestones": [3, 5], "gamma": 0.5},
        ],
        EPOCHS,
    ),
    "multistep-converted": (
        [
            {
                "type": "MultiStepLR",
                "milestones": [3, 5],
                "gamma": 0.5,
                "convert_to_iter_based": True,
            }
        ],
        EPOCHS,
    ),
    "multistep-by-iter-max_iters": (
        [{"type": "MultiStepLR", "milestones": [20, 30], "gamma": 0.5, "by_epoch": False}],
        ITERS,
    ),
    "step-by-epoch-max_iters": ([{"type": "StepLR", "step_size": 1, "gamma": 0.8}], ITERS),
}

# Schedules stretched by the horizon: the first run's epochs already differ from a
# longer run's, so no continuation can be exact.
SHAPED = {
    "cosine": ([{"type": "CosineAnnealingLR"}], EPOCHS, "CosineAnnealingLR"),
    "one-cycle": ([{"type": "OneCycleLR", "eta_max": 0.1}], EPOCHS, "OneCycleLR"),
    "poly": ([{"type": "PolyLR", "power": 2.0}], EPOCHS, "PolyLR"),
    "linear": ([{"type": "LinearLR", "start_factor": 0.5}], EPOCHS, "LinearLR"),
    "constant": ([{"type": "ConstantLR", "factor": 0.5}], EPOCHS, "ConstantLR"),
    "cosine-converted": (
        [{"type": "CosineAnnealingLR", "convert_to_iter_based": True}],
        EPOCHS,
        "CosineAnnealingLR",
    ),
    "cosine-by-iter-max_iters": (
        [{"type": "CosineAnnealingLR", "by_epoch": False}],
        ITERS,
        "CosineAnnealingLR",
    ),
}


def config(folder: Path, schedulers: list[dict], horizon: dict, **top):
    data = small_pipeline(folder)
    data["param_scheduler"] = copy.deepcopy(schedulers)
    data["train"] = {"max_epochs": None, "max_iters": None, **horizon}
    data.update(top)
    return validate(data)


def final_checkpoint(ref) -> dict:
    return torch.load(ref.uri, weights_only=True)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of an experiment but the run logs: that a refused run writes no log
    line either is issue 21's point 2, tested with the other refusals."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.relative_to(folder).parts[0] != "runs"
    }


@pytest.mark.parametrize("name", list(EXACT))
def test_a_raised_horizon_ends_bitwise_equal_to_a_straight_run(tmp_path, name):
    schedulers, (first, second) = EXACT[name]
    pl.run(config(tmp_path / "raised", schedulers, first))
    raised, raised_ref = pl.run(config(tmp_path / "raised", schedulers, second))
    straight, straight_ref = pl.run(config(tmp_path / "straight", schedulers, second))

    assert raised.strategy.iter == straight.strategy.iter == straight.max_iters
    assert not raised.forks
    assert_same_training_result(final_checkpoint(raised_ref), final_checkpoint(straight_ref))
    assert raised.strategy.optim_wrapper.get_lr() == straight.strategy.optim_wrapper.get_lr()


@pytest.mark.parametrize("name", list(SHAPED))
def test_a_horizon_shaped_schedule_is_refused_without_a_fork(tmp_path, name):
    schedulers, (first, second), kind = SHAPED[name]
    pl.run(config(tmp_path, schedulers, first))
    experiment = tmp_path / "exp"
    before = folder_bytes(experiment)

    with pytest.raises(ResumeConfigError) as refused:
        pl.run(config(tmp_path, schedulers, second))
    message = str(refused.value)
    assert f"param_scheduler.0 ({kind})" in message
    assert "fork" in message and "\n" not in message
    assert folder_bytes(experiment) == before

    forked, ref = pl.run(config(tmp_path, schedulers, second, fork=True))
    assert forked.strategy.iter == forked.max_iters
    recorded = final_checkpoint(ref)["meta"]["forks"][0]["changes"]
    assert [c["key"] for c in recorded] == [f"train.{next(iter(second))}"]


def test_a_lowered_horizon_ends_bitwise_equal_to_a_straight_run(tmp_path):
    schedulers = [{"type": "MultiStepLR", "milestones": [3, 5], "gamma": 0.5}]
    cfg = config(tmp_path / "lowered", schedulers, {"max_epochs": 6})
    p = pl.build_pipeline(cfg)
    pl.train_one_epoch(p)
    pl.train_one_epoch(p)
    pl.save_epoch(p, {}, background=False)
    # Milestone 3 is at the new horizon: a straight run to 3 epochs never takes it.
    _, lowered_ref = pl.run(config(tmp_path / "lowered", schedulers, {"max_epochs": 3}))
    _, straight_ref = pl.run(config(tmp_path / "straight", schedulers, {"max_epochs": 3}))
    assert_same_training_result(final_checkpoint(lowered_ref), final_checkpoint(straight_ref))


def test_milestone_8_fires_after_a_raise_from_3_to_10_epochs(tmp_path):
    # The digits_mlp schedule, on the synthetic data.
    schedulers = [{"type": "MultiStepLR", "milestones": [8, 12], "gamma": 0.1}]
    pl.run(config(tmp_path / "raised", schedulers, {"max_epochs": 3}))
    raised, _ = pl.run(config(tmp_path / "raised", schedulers, {"max_epochs": 10}))
    straight, _ = pl.run(config(tmp_path / "straight", schedulers, {"max_epochs": 10}))
    assert raised.strategy.optim_wrapper.get_lr() == straight.strategy.optim_wrapper.get_lr()
    assert raised.strategy.param_schedulers[0].end == 10


def test_a_skipped_step_that_a_later_scheduler_followed_is_refused(tmp_path):
    # At epoch 3 the first run's MultiStepLR stopped (its end defaulted to 3) and the
    # ExponentialLR after it stepped; a run to 6 takes milestone 3 first, then the decay.
    schedulers = [
        {"type": "MultiStepLR", "milestones": [3], "gamma": 0.5},
        {"type": "ExponentialLR", "gamma": 0.9, "end": 100},
    ]
    pl.run(config(tmp_path, schedulers, {"max_epochs": 3}))
    with pytest.raises(ResumeConfigError, match=r"param_scheduler\.0 \(MultiStepLR\).*order"):
        pl.run(config(tmp_path, schedulers, {"max_epochs": 6}))
    forked, _ = pl.run(config(tmp_path, schedulers, {"max_epochs": 6}, fork=True))
    assert forked.forks
