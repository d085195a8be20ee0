"""Interop with the real mmengine 0.10.x: schedules step for step, checkpoints both ways."""

import copy
import warnings

import pytest
import torch
from torch import nn

from baton import SingleDeviceStrategy
from baton.build import build_scheduler

mmengine_strategy = pytest.importorskip("mmengine._strategy")
pytestmark = pytest.mark.mmengine

MAX_EPOCHS = 6
EPOCH_LENGTH = 5
SCHEDULE_CONFIGS = {
    "linear-warmup": [{"type": "LinearLR", "start_factor": 0.1, "by_epoch": False, "end": 7}],
    "constant": [{"type": "ConstantLR", "factor": 0.5, "end": 3}],
    "step": [{"type": "StepLR", "step_size": 2, "gamma": 0.5}],
    "multistep": [{"type": "MultiStepLR", "milestones": [1, 3, 3], "gamma": 0.3}],
    "exponential": [{"type": "ExponentialLR", "gamma": 0.9}],
    "cosine": [{"type": "CosineAnnealingLR", "eta_min": 0.001}],
    "cosine-ratio-iter": [
        {"type": "CosineAnnealingLR", "eta_min_ratio": 0.1, "convert_to_iter_based": True}
    ],
    "poly": [{"type": "PolyLR", "power": 2.0, "eta_min": 1e-4, "by_epoch": False, "end": 30}],
    "onecycle": [{"type": "OneCycleLR", "eta_max": 0.5, "by_epoch": False, "end": 30}],
    "warmup-then-cosine": [
        {"type": "LinearLR", "start_factor": 0.01, "by_epoch": False, "begin": 0, "end": 8},
        {"type": "CosineAnnealingLR", "begin": 1, "end": MAX_EPOCHS, "convert_to_iter_based": True},
    ],
    "warmup-then-multistep": [
        {"type": "LinearLR", "start_factor": 0.2, "by_epoch": False, "end": 4},
        {"type": "MultiStepLR", "milestones": [2, 4], "gamma": 0.1},
    ],
}


def lr_sequence(optimizer_wrapper, schedulers):
    """The learning rate at every iteration of MAX_EPOCHS epochs, stepped as the loop does."""
    seen = []
    for _ in range(MAX_EPOCHS):
        for _ in range(EPOCH_LENGTH):
            seen.append(optimizer_wrapper.param_groups[0]["lr"])
            optimizer_wrapper.step()
            for s in schedulers:
                if not s.by_epoch:
                    s.step()
        for s in schedulers:
            if s.by_epoch:
                s.step()
    return seen


def mm_sequence(cfgs):
    from mmengine.optim import OptimWrapper
    from mmengine.registry import PARAM_SCHEDULERS

    model = nn.Linear(2, 1)
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    schedulers = []
    for cfg in copy.deepcopy(cfgs):
        cfg.setdefault(
            "end", MAX_EPOCHS if cfg.get("by_epoch", True) else MAX_EPOCHS * EPOCH_LENGTH
        )
        schedulers.append(
            PARAM_SCHEDULERS.build(
                cfg, default_args={"optimizer": wrapper, "epoch_length": EPOCH_LENGTH}
            )
        )
    return lr_sequence(wrapper, schedulers)


def baton_sequence(cfgs):
    from baton.optim import OptimWrapper

    model = nn.Linear(2, 1)
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    schedulers = [
        build_scheduler(
            cfg,
            wrapper,
            epoch_length=EPOCH_LENGTH,
            max_epochs=MAX_EPOCHS,
            max_iters=MAX_EPOCHS * EPOCH_LENGTH,
        )
        for cfg in cfgs
    ]
    return lr_sequence(wrapper, schedulers)


@pytest.mark.parametrize("name", sorted(SCHEDULE_CONFIGS))
def test_learning_rates_equal_mmengine_step_for_step(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = mm_sequence(SCHEDULE_CONFIGS[name])
    assert baton_sequence(SCHEDULE_CONFIGS[name]) == expected


def _mm_strategy(work_dir, seed):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mmengine_strategy.SingleDeviceStrategy(
            work_dir=str(work_dir), env_kwargs={"randomness": {"seed": seed}}
        )


OPTIM = {"optimizer": {"type": "SGD", "lr": 0.1, "momentum": 0.9}}
SCHED = [
    {"type": "LinearLR", "start_factor": 0.1, "by_epoch": False, "end": 4},
    {"type": "MultiStepLR", "milestones": [1, 2], "gamma": 0.5},
]
DISPATCH = {"max_epochs": 3, "max_iters": 12, "epoch_length": 4}


def _train_steps(model, wrapper, schedulers, steps):
    for _ in range(steps):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        wrapper.update_params(loss)
        for s in schedulers:
            if not s.by_epoch:
                s.step()
    for s in schedulers:
        if s.by_epoch:
            s.step()


def test_baton_resumes_a_checkpoint_written_by_mmengine(tmp_path, tiny_net):
    mm = _mm_strategy(tmp_path / "mm", seed=11)
    model, wrapper, schedulers = mm.prepare(
        copy.deepcopy(tiny_net),
        optim_wrapper=copy.deepcopy(OPTIM),
        param_scheduler=copy.deepcopy(SCHED),
        dispatch_kwargs=DISPATCH,
    )
    _train_steps(model, wrapper, schedulers, 4)
    path = tmp_path / "mm_epoch_1.pth"
    mm.save_checkpoint(str(path), extra_ckpt={"meta": {"epoch": 1, "iter": 4}})

    ours = SingleDeviceStrategy(
        work_dir=str(tmp_path / "ours"),
        experiment_name="from-mm",
        env_kwargs={"randomness": {"seed": 11}},
    )
    ours.prepare(
        copy.deepcopy(tiny_net),
        optim_wrapper=OPTIM,
        param_scheduler=SCHED,
        dispatch_kwargs=DISPATCH,
    )
    ours.resume(str(path))
    assert (ours.epoch, ours.iter) == (1, 4)
    for key, value in model.state_dict().items():
        assert torch.equal(ours.model.state_dict()[key], value)
    assert ours.optim_wrapper.get_lr() == {"lr": [g["lr"] for g in wrapper.param_groups]}
    assert [s.last_step for s in ours.param_schedulers] == [s.last_step for s in schedulers]
    momentum = wrapper.optimizer.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(
        ours.optim_wrapper.optimizer.state_dict()["state"][0]["momentum_buffer"], momentum
    )


def test_mmengine_resumes_a_checkpoint_written_by_baton(tmp_path, tiny_net):
    ours = SingleDeviceStrategy(
        work_dir=str(tmp_path / "ours"),
        experiment_name="to-mm",
        env_kwargs={"randomness": {"seed": 5}},
    )
    model, wrapper, schedulers = ours.prepare(
        copy.deepcopy(tiny_net),
        optim_wrapper=OPTIM,
        param_scheduler=SCHED,
        dispatch_kwargs=DISPATCH,
    )
    _train_steps(model, wrapper, schedulers, 4)
    ours.epoch, ours.iter = 1, 4
    ref = ours.save_checkpoint("epoch_0001.pth")

    mm = _mm_strategy(tmp_path / "mm", seed=5)
    mm_model, mm_wrapper, mm_schedulers = mm.prepare(
        copy.deepcopy(tiny_net),
        optim_wrapper=copy.deepcopy(OPTIM),
        param_scheduler=copy.deepcopy(SCHED),
        dispatch_kwargs=DISPATCH,
    )
    checkpoint = mm.resume(ref.uri)
    assert checkpoint["meta"]["iter"] == 4
    for key, value in model.state_dict().items():
        assert torch.equal(mm_model.state_dict()[key], value)
    assert [g["lr"] for g in mm_wrapper.param_groups] == [g["lr"] for g in wrapper.param_groups]
    assert [s.last_step for s in mm_schedulers] == [s.last_step for s in schedulers]
    # and the schedules continue identically from there
    _train_steps(model, wrapper, schedulers, 4)
    _train_steps(mm_model, mm_wrapper, mm_schedulers, 4)
    assert [g["lr"] for g in mm_wrapper.param_groups] == [g["lr"] for g in wrapper.param_groups]
