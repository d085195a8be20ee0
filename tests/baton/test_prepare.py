"""prepare(): return shapes, building from dicts, accumulation, compile, conversion."""

import copy

import pytest
import torch
from torch import nn

from baton import AmpOptimWrapper, OptimWrapper, SingleDeviceStrategy
from baton.engine.convert import BatchNormXd
from baton.optim.schedulers import CosineAnnealingLR, LinearLR


@pytest.fixture
def strategy(work_dir):
    return SingleDeviceStrategy(work_dir=str(work_dir), env_kwargs={"randomness": {"seed": 0}})


def test_model_only_returns_the_model(strategy, tiny_net):
    assert strategy.prepare(tiny_net) is tiny_net


def test_returns_model_and_wrapper(strategy, tiny_net):
    model, wrapper = strategy.prepare(
        tiny_net, optim_wrapper={"optimizer": {"type": "SGD", "lr": 0.1}}
    )
    assert model is tiny_net and isinstance(wrapper, OptimWrapper)
    assert isinstance(wrapper.optimizer, torch.optim.SGD)


def test_returns_three_and_second_call_returns_same_objects(strategy, tiny_net):
    first = strategy.prepare(
        tiny_net,
        optim_wrapper={"optimizer": {"type": "SGD", "lr": 0.1}},
        param_scheduler={"type": "LinearLR", "by_epoch": False, "end": 3},
    )
    second = strategy.prepare(nn.Linear(1, 1))
    assert len(first) == 3 and all(a is b for a, b in zip(first, second, strict=True))
    assert isinstance(first[2][0], LinearLR)


def test_model_from_a_dict(strategy):
    model = strategy.prepare({"type": "MLP", "in_features": 4, "num_classes": 2, "hidden": [3]})
    assert model(torch.zeros(1, 4)).shape == (1, 2)


def test_model_from_a_dotted_path(strategy):
    model = strategy.prepare({"type": "torch.nn.Linear", "in_features": 4, "out_features": 2})
    assert isinstance(model, nn.Linear)


def test_model_type_outside_allowed_modules_is_refused(strategy):
    with pytest.raises(ValueError, match="'os.system' is outside the allowed modules"):
        strategy.prepare({"type": "os.system", "command": "echo pwned"})


def test_init_weights_is_called(strategy):
    class WithInit(nn.Linear):
        def init_weights(self):
            nn.init.constant_(self.weight, 0.5)

    model = strategy.prepare(WithInit(2, 2))
    assert torch.all(model.weight == 0.5)


def test_built_optimizer_is_wrapped(strategy, tiny_net):
    optimizer = torch.optim.Adam(tiny_net.parameters())
    _, wrapper = strategy.prepare(tiny_net, optim_wrapper=optimizer)
    assert wrapper.optimizer is optimizer


def test_amp_wrapper_from_dict(strategy, tiny_net):
    _, wrapper = strategy.prepare(
        tiny_net, optim_wrapper={"type": "AmpOptimWrapper", "optimizer": {"type": "SGD", "lr": 0.1}}
    )
    assert isinstance(wrapper, AmpOptimWrapper)
    assert wrapper.cast_dtype is None  # as given (mmengine); the device's default applies
    with wrapper.optim_context(tiny_net):
        assert tiny_net(torch.zeros(2, 8)).dtype == torch.bfloat16  # CPU autocast
    assert "loss_scaler" in wrapper.state_dict()


@pytest.mark.parametrize(
    ("cfg", "error", "message"),
    [
        (
            {"optimizer": {"type": "NoSuchOpt", "lr": 1}},
            ValueError,
            "unknown optimizer type 'NoSuchOpt'",
        ),
        (
            {"type": "Fancy", "optimizer": {"type": "SGD", "lr": 1}},
            ValueError,
            "optim_wrapper type 'Fancy'",
        ),
        ({"accumulative_counts": 2}, ValueError, "needs an 'optimizer'"),
        ({"optimizer": {"type": "SGD", "lr": 1}, "paramwise_cfg": {}}, ValueError, "unsupported"),
        # mmengine's exception types: torch's TypeError for a bad clip argument (mmengine
        # meets it at the first step, baton up front), an AssertionError for the count.
        (
            {"optimizer": {"type": "SGD", "lr": 1}, "clip_grad": {"max_nrm": 1}},
            TypeError,
            "unexpected keyword argument 'max_nrm'; clip_grad",
        ),
        (
            {"optimizer": {"type": "SGD", "lr": 1}, "accumulative_counts": 0},
            AssertionError,
            "_accumulative_counts at least greater than or equal to 1",
        ),
    ],
)
def test_bad_optim_wrapper_configs(strategy, tiny_net, cfg, error, message):
    with pytest.raises(error, match=message):
        strategy.prepare(tiny_net, optim_wrapper=cfg)


def test_accumulation_needs_max_iters(strategy, tiny_net):
    with pytest.raises(
        ValueError, match="accumulative_counts is 4, so dispatch_kwargs must give 'max_iters'"
    ):
        strategy.prepare(
            tiny_net,
            optim_wrapper={"optimizer": {"type": "SGD", "lr": 0.1}, "accumulative_counts": 4},
        )


def test_accumulation_steps_every_n_and_scales_the_last_window(strategy):
    model = nn.Linear(1, 1, bias=False)
    _, wrapper = strategy.prepare(
        model,
        optim_wrapper={"optimizer": {"type": "SGD", "lr": 1.0}, "accumulative_counts": 3},
        dispatch_kwargs={"max_iters": 5},
    )
    steps = []
    for _ in range(5):
        before = model.weight.detach().clone()
        wrapper.update_params(model(torch.ones(1, 1)).sum())
        steps.append(not torch.equal(before, model.weight))
    assert steps == [False, False, True, False, True]


def test_param_scheduler_without_optimizer(strategy, tiny_net):
    with pytest.raises(ValueError, match="param_scheduler needs an optim_wrapper"):
        strategy.prepare(tiny_net, param_scheduler={"type": "LinearLR"})


def test_scheduler_default_end_needs_max_epochs(strategy, tiny_net):
    with pytest.raises(ValueError, match="has no 'end' and max_epochs is unknown"):
        strategy.prepare(
            tiny_net,
            optim_wrapper={"optimizer": {"type": "SGD", "lr": 0.1}},
            param_scheduler={"type": "CosineAnnealingLR"},
        )


def test_convert_to_iter_based_needs_epoch_length(strategy, tiny_net):
    with pytest.raises(AssertionError, match="`epoch_length` must be a positive integer"):
        strategy.prepare(
            tiny_net,
            optim_wrapper={"optimizer": {"type": "SGD", "lr": 0.1}},
            param_scheduler={"type": "CosineAnnealingLR", "convert_to_iter_based": True},
            dispatch_kwargs={"max_epochs": 3},
        )


def test_unknown_scheduler_lists_choices(strategy, tiny_net):
    with pytest.raises(ValueError, match="unknown scheduler type 'Cosine'.*CosineAnnealingLR"):
        strategy.prepare(
            tiny_net,
            optim_wrapper={"optimizer": {"type": "SGD", "lr": 0.1}},
            param_scheduler={"type": "Cosine", "end": 3},
        )


def test_bad_scheduler_argument_lists_accepted_ones(strategy, tiny_net):
    with pytest.raises(ValueError, match="StepLR has no argument 'step'; it accepts step_size"):
        strategy.prepare(
            tiny_net,
            optim_wrapper={"optimizer": {"type": "SGD", "lr": 0.1}},
            param_scheduler={"type": "StepLR", "step": 3, "end": 3},
        )


def test_built_scheduler_is_kept(strategy, tiny_net):
    wrapper = OptimWrapper(torch.optim.SGD(tiny_net.parameters(), lr=0.1))
    cosine = CosineAnnealingLR(wrapper, end=5)
    *_, schedulers = strategy.prepare(tiny_net, optim_wrapper=wrapper, param_scheduler=cosine)
    assert schedulers == [cosine]


def test_compile_dict_is_not_mutated(strategy, tiny_net):
    options = {"target": "forward", "backend": "eager"}
    frozen = copy.deepcopy(options)
    model = strategy.prepare(tiny_net, compile=options)
    assert options == frozen
    assert model(torch.zeros(2, 8)).shape == (2, 3)
    assert model.forward is not type(model).forward


def test_sync_batchnorm_is_converted_during_prepare(strategy):
    model = nn.Sequential(nn.Linear(4, 4), nn.SyncBatchNorm(4))
    prepared = strategy.prepare(model)
    assert isinstance(prepared[1], BatchNormXd)
    assert prepared(torch.randn(3, 4)).shape == (3, 4)


def test_convert_model_keeps_tensors_and_flags(strategy):
    sync = nn.SyncBatchNorm(6)
    sync.weight.requires_grad_(False)
    sync.eval()
    root = nn.Sequential(nn.Conv2d(1, 6, 1), nn.Sequential(sync))
    converted = strategy.convert_model(root)
    bn = converted[1][0]
    assert isinstance(bn, BatchNormXd)
    assert bn.weight is sync.weight and bn.bias is sync.bias
    assert bn.running_mean is sync.running_mean and bn.running_var is sync.running_var
    assert bn.num_batches_tracked is sync.num_batches_tracked
    assert not bn.weight.requires_grad and not bn.training
    for rank in (2, 3, 4, 5):
        assert bn(torch.randn(*([2, 6] + [3] * (rank - 2)))).dim() == rank


def test_convert_model_root_sync_batchnorm(strategy):
    converted = strategy.convert_model(nn.SyncBatchNorm(3))
    assert isinstance(converted, BatchNormXd)


def test_mmcv_sync_batchnorm_is_recognised_without_mmcv(strategy):
    fake_cls = type("SyncBatchNorm", (nn.BatchNorm2d,), {"__module__": "mmcv.ops.sync_bn"})
    converted = strategy.convert_model(nn.Sequential(fake_cls(3)))
    assert isinstance(converted[0], BatchNormXd)
