"""save_checkpoint / load_checkpoint / resume: layout, formats, errors."""

import copy
import logging
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import baton
from baton import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    SingleDeviceStrategy,
)

from ..conftest import TinyNet

OPTIM = {"optimizer": {"type": "SGD", "lr": 0.1, "momentum": 0.9}}
SCHED = {"type": "StepLR", "step_size": 1, "by_epoch": True, "end": 5}


def make(work_dir, name="exp", seed=3, **prepare):
    strategy = SingleDeviceStrategy(
        work_dir=str(work_dir), experiment_name=name, env_kwargs={"randomness": {"seed": seed}}
    )
    torch.manual_seed(0)
    strategy.prepare(TinyNet(), **prepare)
    return strategy


def test_layout_meta_and_cpu_tensors(work_dir):
    strategy = make(work_dir, optim_wrapper=OPTIM, param_scheduler=SCHED)
    strategy.model(torch.randn(4, 8)).sum().backward()
    strategy.optim_wrapper.step()
    strategy.epoch, strategy.iter = 2, 20
    ref = strategy.save_checkpoint("epoch_0002.pth", extra_ckpt={"dataset_meta": {"classes": 3}})
    checkpoint = torch.load(ref.uri, weights_only=True)  # plain torch, weights only
    assert {"meta", "state_dict", "optimizer", "param_schedulers", "dataset_meta"} <= set(
        checkpoint
    )
    meta = checkpoint["meta"]
    assert (meta["epoch"], meta["iter"], meta["seed"]) == (2, 20, 3)
    assert {"python", "numpy", "torch"} <= set(meta["rng"])
    assert meta["baton"] == baton.__version__ and "time" in meta and "config_hash" in meta
    state = checkpoint["optimizer"]["state"][0]["momentum_buffer"]
    assert state.device.type == "cpu"
    assert (ref.epoch, ref.iter, ref.size) == (2, 20, Path(ref.uri).stat().st_size)


def test_bare_name_goes_to_the_experiment_and_its_manifest(work_dir):
    strategy = make(work_dir)
    ref = strategy.save_checkpoint("epoch_0001.pth")
    assert ref.uri == str(work_dir / "exp" / "checkpoints" / "epoch_0001.pth")
    assert strategy.checkpoints.latest() == ref


def test_explicit_path_is_written_there_without_manifest(work_dir, tmp_path):
    strategy = make(work_dir)
    target = tmp_path / "elsewhere" / "model.pth"
    ref = strategy.save_checkpoint(str(target))
    assert target.exists() and ref.uri == str(target)
    assert strategy.checkpoints.list() == []


def test_save_without_optimizer_and_schedulers(work_dir):
    strategy = make(work_dir, optim_wrapper=OPTIM, param_scheduler=SCHED)
    ref = strategy.save_checkpoint("a.pth", save_optimizer=False, save_param_scheduler=False)
    checkpoint = torch.load(ref.uri, weights_only=True)
    assert "optimizer" not in checkpoint and "param_schedulers" not in checkpoint


def test_extra_ckpt_is_not_mutated_and_callback_sees_the_dict(work_dir):
    strategy = make(work_dir)
    extra = {"meta": {"epoch": 7, "note": "hi"}, "history": [1, 2]}
    frozen = copy.deepcopy(extra)
    seen = {}

    def callback(checkpoint):
        seen.update(checkpoint)
        checkpoint["added_by_callback"] = True

    ref = strategy.save_checkpoint("x.pth", extra_ckpt=extra, callback=callback)
    assert extra == frozen
    assert seen["meta"]["note"] == "hi" and seen["meta"]["epoch"] == 7
    assert torch.load(ref.uri, weights_only=True)["added_by_callback"] is True


def test_metrics_in_extra_meta_reach_the_reference(work_dir):
    strategy = make(work_dir)
    ref = strategy.save_checkpoint("m.pth", extra_ckpt={"meta": {"metrics": {"accuracy": 0.9}}})
    assert ref.metrics == {"accuracy": 0.9}


def test_load_requires_prepare(work_dir):
    strategy = SingleDeviceStrategy(work_dir=str(work_dir))
    with pytest.raises(RuntimeError, match=r"call prepare\(model, ...\) before load_checkpoint"):
        strategy.load_checkpoint("whatever.pth")


@pytest.mark.parametrize("wrapping", ["state_dict", "model", "bare"])
def test_load_accepts_the_three_layouts(work_dir, tmp_path, wrapping):
    source = TinyNet()
    weights = source.state_dict()
    payload = weights if wrapping == "bare" else {wrapping: weights, "meta": {"epoch": 1}}
    path = tmp_path / "weights.pth"
    torch.save(payload, path)
    strategy = make(work_dir)
    rest = strategy.load_checkpoint(str(path), strict=True)
    for key, value in weights.items():
        assert torch.equal(strategy.model.state_dict()[key], value)
    assert "state_dict" not in rest and "model" not in rest


def test_default_revise_keys_strip_module_prefix_only_with_a_dot(work_dir, tmp_path):
    weights = {f"module.{k}": v for k, v in TinyNet().state_dict().items()}
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": weights}, path)
    make(work_dir).load_checkpoint(str(path), strict=True)
    # 'moduleX' must not match r'^module\.' (mmengine's unescaped pattern would strip it)
    torch.save({"state_dict": {"moduleXfc1.weight": torch.zeros(16, 8)}}, path)
    with pytest.raises(CheckpointMismatchError, match="unexpected keys \\['moduleXfc1.weight'\\]"):
        make(work_dir, name="b").load_checkpoint(str(path), strict=True)


def test_revise_keys_apply_in_order_after_callback(work_dir, tmp_path):
    weights = {f"backbone.{k}": v for k, v in TinyNet().state_dict().items()}
    path = tmp_path / "w.pth"
    torch.save({"state_dict": weights, "meta": {}}, path)
    order = []

    def callback(checkpoint):
        order.append(sorted(checkpoint["state_dict"])[0])

    make(work_dir).load_checkpoint(
        str(path),
        strict=True,
        revise_keys=[(r"^backbone\.", "net."), (r"^net\.", "")],
        callback=callback,
    )
    assert order == ["backbone.fc1.bias"]


def test_strict_names_missing_unexpected_and_misshaped_keys(work_dir, tmp_path):
    weights = TinyNet().state_dict()
    weights.pop("fc2.bias")
    weights["extra.weight"] = torch.zeros(1)
    weights["fc1.weight"] = torch.zeros(3, 3)
    path = tmp_path / "bad.pth"
    torch.save(weights, path)
    strategy = make(work_dir)
    with pytest.raises(CheckpointMismatchError) as info:
        strategy.load_checkpoint(str(path), strict=True)
    message = str(info.value)
    assert "missing keys ['fc2.bias']" in message
    assert "unexpected keys ['extra.weight']" in message
    assert "fc1.weight: (3, 3) vs (16, 8)" in message
    assert "Pass strict=False" in message


def test_non_strict_loads_the_rest_and_warns(work_dir, tmp_path, caplog):
    source = TinyNet()
    weights = source.state_dict()
    weights.pop("fc2.bias")
    path = tmp_path / "partial.pth"
    torch.save(weights, path)
    strategy = make(work_dir)
    with caplog.at_level(logging.WARNING):
        strategy.load_checkpoint(str(path))
    assert torch.equal(strategy.model.fc1.weight, source.fc1.weight)
    assert "missing keys ['fc2.bias']" in caplog.text


def test_load_a_file_that_is_not_a_dict(work_dir, tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="holds a list, not a checkpoint dict"):
        make(work_dir).load_checkpoint(str(path))


def test_load_a_dict_without_weights(work_dir, tmp_path):
    path = tmp_path / "meta_only.pth"
    torch.save({"meta": {"epoch": 1}}, path)
    with pytest.raises(CheckpointError, match="has no model weights"):
        make(work_dir).load_checkpoint(str(path))


def test_missing_file(work_dir, tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        make(work_dir).load_checkpoint(str(tmp_path / "nope.pth"))


def test_resume_missing_optimizer_says_what_to_pass(work_dir):
    writer = make(work_dir)
    ref = writer.save_checkpoint("w.pth")
    reader = make(work_dir, name="r", optim_wrapper=OPTIM)
    with pytest.raises(CheckpointMismatchError, match="pass resume_optimizer=False"):
        reader.resume(ref.uri)
    reader.resume(ref.uri, resume_optimizer=False)


def test_resume_missing_schedulers_says_what_to_pass(work_dir):
    writer = make(work_dir, optim_wrapper=OPTIM)
    ref = writer.save_checkpoint("w.pth")
    reader = make(work_dir, name="r", optim_wrapper=OPTIM, param_scheduler=SCHED)
    with pytest.raises(CheckpointMismatchError, match="pass resume_param_scheduler=False"):
        reader.resume(ref.uri)
    reader.resume(ref.uri, resume_param_scheduler=False)


def test_resume_optimizer_of_another_shape(work_dir, tmp_path):
    other = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9)
    torch.save(
        {"state_dict": TinyNet().state_dict(), "optimizer": other.state_dict()}, tmp_path / "o.pth"
    )
    reader = make(work_dir, optim_wrapper=OPTIM)
    with pytest.raises(CheckpointMismatchError, match="does not fit this optimizer"):
        reader.resume(str(tmp_path / "o.pth"))


def test_resume_seed_mismatch_warns_and_checkpoint_wins(work_dir, caplog):
    ref = make(work_dir, seed=1).save_checkpoint("s.pth")
    reader = make(work_dir, name="r", seed=2)
    with caplog.at_level(logging.WARNING):
        reader.resume(ref.uri)
    assert reader.seed == 1 and reader.randomness["seed"] == 1
    assert "seed 1 differs from the configured seed 2" in caplog.text


def test_resume_restores_rng_states(work_dir):
    writer = make(work_dir)
    ref = writer.save_checkpoint("r.pth")
    expected = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    reader = make(work_dir, name="r", seed=99)
    reader.resume(ref.uri)
    got = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]


def test_resume_without_meta_iter(work_dir, tmp_path, caplog):
    path = tmp_path / "old.pth"
    torch.save({"state_dict": TinyNet().state_dict(), "meta": {"epoch": 3, "seed": 3}}, path)
    strategy = SingleDeviceStrategy(work_dir=str(work_dir), env_kwargs={"randomness": {"seed": 3}})
    strategy.prepare(TinyNet(), dispatch_kwargs={"epoch_length": 10})
    with caplog.at_level(logging.WARNING):
        strategy.resume(str(path))
    assert (strategy.epoch, strategy.iter) == (3, 30)
    assert "has no meta['iter']" in caplog.text


def test_map_location_default_is_the_strategy_device(work_dir):
    ref = make(work_dir).save_checkpoint("d.pth")
    reader = make(work_dir, name="r")
    seen = []
    reader.load_checkpoint(ref.uri, map_location="default", callback=lambda c: seen.append(c))
    device = next(iter(seen[0]["state_dict"].values())).device
    assert device.type == reader.device.type


def test_saved_files_have_normal_permissions(work_dir):
    ref = make(work_dir).save_checkpoint("p.pth")
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(ref.uri).st_mode & 0o777 == 0o666 & ~mask


class LazyNet(nn.Module):
    """A linear layer that learns its input size from the first batch, as SmallCNN's head."""

    def __init__(self):
        super().__init__()
        self.fc = nn.LazyLinear(3)
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        return self.fc(self.drop(x))


def _lazy_strategy(work_dir, name):
    strategy = SingleDeviceStrategy(
        work_dir=str(work_dir), experiment_name=name, env_kwargs={"randomness": {"seed": 3}}
    )
    strategy.prepare(LazyNet(), optim_wrapper={"optimizer": {"type": "AdamW", "lr": 0.1}})
    return strategy


def _lazy_step(strategy, x):
    strategy.optim_wrapper.update_params(strategy.model(x).square().mean())


@pytest.mark.parametrize("how", ["resume", "load_checkpoint"])
def test_a_model_with_lazy_parameters_resumes_and_loads_exactly(work_dir, how):
    # The model and its optimizer are built before the load, with the lazy parameters not
    # yet sized: the load gives them the checkpoint's shapes, and the optimizer, which
    # holds the same parameter objects, trains them on.
    batches = torch.randn(3, 4, 5)
    straight = _lazy_strategy(work_dir, "straight")
    for x in batches:
        _lazy_step(straight, x)
    first = _lazy_strategy(work_dir, "first")
    _lazy_step(first, batches[0])
    ref = first.save_checkpoint("epoch_0001.pth")

    second = _lazy_strategy(work_dir, "second")
    if how == "load_checkpoint":
        second.load_checkpoint(ref.uri, strict=True)
        assert torch.equal(second.model.fc.weight, first.model.fc.weight)
        return
    second.resume(ref.uri)
    for x in batches[1:]:
        _lazy_step(second, x)
    for key, value in straight.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[key], value), key
