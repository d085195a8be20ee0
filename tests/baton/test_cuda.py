"""What only a GPU can show; skipped without CUDA, run when a device is lent."""

import pytest
import torch
from torch import nn

from baton import SingleDeviceStrategy

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def make(work_dir, **prepare):
    strategy = SingleDeviceStrategy(
        work_dir=str(work_dir), experiment_name="gpu", env_kwargs={"randomness": {"seed": 1}}
    )
    strategy.prepare(nn.Linear(16, 16), **prepare)
    return strategy


def test_model_lands_on_the_gpu_and_checkpoints_hold_cpu_tensors(work_dir):
    strategy = make(
        work_dir, optim_wrapper={"optimizer": {"type": "SGD", "lr": 0.1, "momentum": 0.9}}
    )
    assert next(strategy.model.parameters()).is_cuda
    strategy.model(torch.randn(4, 16, device="cuda")).sum().backward()
    strategy.optim_wrapper.step()
    checkpoint = torch.load(strategy.save_checkpoint("e.pth").uri, weights_only=True)
    assert all(t.device.type == "cpu" for t in checkpoint["state_dict"].values())
    assert checkpoint["optimizer"]["state"][0]["momentum_buffer"].device.type == "cpu"
    assert "cuda" in checkpoint["meta"]["rng"]


def test_resume_restores_the_cuda_rng_and_maps_to_the_device(work_dir):
    writer = make(work_dir)
    torch.cuda.manual_seed(7)
    ref = writer.save_checkpoint("r.pth")
    expected = torch.rand(3, device="cuda")
    reader = make(work_dir)
    seen = []
    reader.resume(
        ref.uri, callback=lambda c: seen.append(next(iter(c["state_dict"].values())).device)
    )
    assert seen[0].type == "cuda"
    assert torch.equal(torch.rand(3, device="cuda"), expected)


def test_amp_float16_with_a_loss_scaler_round_trips(work_dir):
    strategy = make(
        work_dir, optim_wrapper={"type": "AmpOptimWrapper", "optimizer": {"type": "SGD", "lr": 0.1}}
    )
    wrapper = strategy.optim_wrapper
    assert wrapper.cast_dtype == torch.float16 and wrapper.loss_scaler.is_enabled()
    with wrapper.optim_context(strategy.model):
        out = strategy.model(torch.randn(4, 16, device="cuda"))
    assert out.dtype == torch.float16
    wrapper.update_params(out.float().pow(2).mean())
    ref = strategy.save_checkpoint("amp.pth")
    other = make(
        work_dir, optim_wrapper={"type": "AmpOptimWrapper", "optimizer": {"type": "SGD", "lr": 0.1}}
    )
    other.resume(ref.uri)
    assert other.optim_wrapper.loss_scaler.get_scale() == wrapper.loss_scaler.get_scale()
