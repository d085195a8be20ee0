"""Helpers shared by the engine tests."""

import torch

from baton import SingleDeviceStrategy
from baton.data import ResumableLoader, SyntheticClassification
from baton.models import MLP

EPOCH_LENGTH = 8  # 256 samples / 32 per batch


def small_pipeline(work_dir, name="exp", model=None) -> dict:
    """The config of a tiny pipeline on synthetic data (8 iterations per epoch), unvalidated."""
    return {
        "experiment_name": name,
        "work_dir": str(work_dir),
        "randomness": {"seed": 3, "deterministic": True},
        "model": model
        or {"type": "MLP", "in_features": 8, "num_classes": 3, "hidden": [16], "dropout": 0.2},
        "train_data": {"dataset": {"type": "SyntheticClassification"}, "batch_size": 32},
        "val_data": {
            "dataset": {"type": "SyntheticClassification", "seed": 1},
            "batch_size": 64,
            "shuffle": False,
        },
        "optim_wrapper": {"optimizer": {"type": "SGD", "lr": 0.05, "momentum": 0.9}},
        "param_scheduler": [{"type": "StepLR", "step_size": 2, "gamma": 0.5}],
        "train": {"max_epochs": 4},
        "checkpoint": {"keep_last": None},
    }


def make_strategy(work_dir, name="exp", seed=7, **kwargs) -> SingleDeviceStrategy:
    env = {"randomness": {"seed": seed, "deterministic": True}}
    return SingleDeviceStrategy(
        work_dir=str(work_dir), experiment_name=name, env_kwargs=env, **kwargs
    )


def make_loader(seed=3) -> ResumableLoader:
    return ResumableLoader(SyntheticClassification(num_samples=256), 32, shuffle=True, seed=seed)


def mlp() -> MLP:
    return MLP(in_features=8, num_classes=3, hidden=[16], dropout=0.2)


def flat_state(strategy) -> dict[str, torch.Tensor]:
    """Model weights and every tensor of the optimizer state, flattened to one dict."""
    out = {f"model.{k}": v for k, v in strategy.model.state_dict().items()}
    for pid, state in strategy.optim_wrapper.optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"optim.{pid}.{key}"] = value
    return out


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


class GreedyMLP(MLP):
    """An MLP whose constructor changes the list it is given (as some user code does)."""

    def __init__(self, in_features: int = 8, num_classes: int = 3, hidden=()):
        super().__init__(in_features, num_classes, hidden=tuple(hidden))
        hidden.append(99)


# A plateau scheduler on an absolute threshold that no validation after the first beats:
# every later one is a bad epoch, so with patience 0 the learning rate halves after each
# (a skipped or repeated validation shows in the learning rate).
HALVING_PLATEAU = {
    "type": "ReduceOnPlateauLR",
    "monitor": "loss",
    "factor": 0.5,
    "patience": 0,
    "threshold": 100.0,
    "threshold_rule": "abs",
}
