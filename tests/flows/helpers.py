"""Comparing the end states of runs."""

import torch

from baton.checkpoint.store import CheckpointStore


def final_checkpoint(cfg: dict) -> dict:
    store = CheckpointStore(f"{cfg['work_dir']}/{cfg['experiment_name']}")
    ref = store.latest()
    assert ref is not None, "no checkpoint"
    return torch.load(ref.uri, weights_only=True)


def assert_same_training_result(a: dict, b: dict) -> None:
    """Weights, optimizer state and schedulers bitwise equal."""
    assert a["meta"]["iter"] == b["meta"]["iter"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            other = b["optimizer"]["state"][pid][name]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["param_schedulers"] == b["param_schedulers"]
