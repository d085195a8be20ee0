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


AMP = {"type": "AmpOptimWrapper", "optimizer": {"type": "SGD", "lr": 0.1}}


def test_amp_float16_with_a_loss_scaler_round_trips(work_dir):
    strategy = make(work_dir, optim_wrapper=AMP)
    wrapper = strategy.optim_wrapper
    # dtype None, as mmengine: CUDA's autocast default (float16), with a scaler
    assert wrapper.cast_dtype is None and wrapper.loss_scaler.is_enabled()
    with wrapper.optim_context(strategy.model):
        out = strategy.model(torch.randn(4, 16, device="cuda"))
    assert out.dtype == torch.float16
    before = strategy.model.weight.detach().clone()
    wrapper.update_params(out.float().pow(2).mean())
    assert not torch.equal(strategy.model.weight, before)
    ref = strategy.save_checkpoint("amp.pth")
    assert torch.load(ref.uri, weights_only=True)["optimizer"]["loss_scaler"]["scale"] > 0
    other = make(work_dir, optim_wrapper=AMP)
    other.resume(ref.uri)
    assert other.optim_wrapper.loss_scaler.get_scale() == wrapper.loss_scaler.get_scale()


def _step_on_inf(wrapper, model):
    with wrapper.optim_context(model):
        out = model(torch.randn(4, 16, device="cuda"))
    wrapper.update_params(out.float().sum() * float("inf"))


def test_amp_float16_skips_a_step_with_inf_gradients_and_backs_off(work_dir):
    strategy = make(work_dir, optim_wrapper={**AMP, "dtype": "float16"})
    wrapper, model = strategy.optim_wrapper, strategy.model
    scale = wrapper.loss_scaler.get_scale()
    before = model.weight.detach().clone()
    _step_on_inf(wrapper, model)
    assert torch.equal(model.weight, before)
    assert wrapper.loss_scaler.get_scale() == scale * 0.5


def test_amp_static_loss_scale_stays_put(work_dir):
    strategy = make(work_dir, optim_wrapper={**AMP, "loss_scale": 512.0})
    wrapper = strategy.optim_wrapper
    assert wrapper._scale_update_param == 512.0
    _step_on_inf(wrapper, strategy.model)
    assert wrapper.loss_scaler.get_scale() == 512.0  # update(new_scale), as mmengine


@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
    reason="needs bfloat16 on the device",
)
def test_amp_bfloat16_trains_without_a_loss_scaler(work_dir):
    strategy = make(work_dir, optim_wrapper={**AMP, "dtype": "bfloat16"})
    wrapper, model = strategy.optim_wrapper, strategy.model
    assert wrapper.cast_dtype == torch.bfloat16 and not wrapper.loss_scaler.is_enabled()
    with wrapper.optim_context(model):
        out = model(torch.randn(4, 16, device="cuda"))
    assert out.dtype == torch.bfloat16
    before = model.weight.detach().clone()
    wrapper.update_params(out.float().pow(2).mean())
    assert not torch.equal(model.weight, before)
    ref = strategy.save_checkpoint("bf16.pth")
    assert torch.load(ref.uri, weights_only=True)["optimizer"]["loss_scaler"] == {}
    other = make(work_dir, optim_wrapper={**AMP, "dtype": "bfloat16"})
    other.resume(ref.uri)  # an empty scaler state loads
    assert torch.equal(other.model.weight, model.weight)


def test_amp_autocasts_where_the_model_is_when_the_context_is_entered():
    from baton.optim import AmpOptimWrapper

    model = nn.Linear(16, 16)  # on the CPU when the wrapper is built
    wrapper = AmpOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    model.cuda()
    with wrapper.optim_context(model):
        assert model(torch.randn(4, 16, device="cuda")).dtype == torch.float16


def test_amp_float16_equals_mmengine_s_on_cuda():
    mm_optim = pytest.importorskip("mmengine.optim")
    from baton.optim import AmpOptimWrapper

    results = []
    for cls in (mm_optim.AmpOptimWrapper, AmpOptimWrapper):
        torch.manual_seed(0)
        model = nn.Linear(16, 16).cuda()
        wrapper = cls(
            dtype="float16",
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            clip_grad={"max_norm": 1.0},
        )
        torch.manual_seed(1)
        for _ in range(3):
            with wrapper.optim_context(model):
                out = model(torch.randn(4, 16, device="cuda"))
            wrapper.update_params(out.float().pow(2).mean())
        results.append((model.weight.detach().clone(), wrapper.loss_scaler.get_scale()))
    (mm_weight, mm_scale), (weight, scale) = results
    assert torch.equal(weight, mm_weight) and scale == mm_scale
