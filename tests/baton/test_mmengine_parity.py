"""baton's schedulers and optimizer wrappers against mmengine's, call for call.

Each test makes the same calls on mmengine 0.10.x's classes and on baton's and compares
what comes back: values at every step, warnings, exception types (baton's messages start
with mmengine's words) and state dicts. Where baton differs on purpose the test says so,
and ``docs/mmengine.md`` lists it.
"""

import contextlib
import copy
import logging
import types
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from baton import optim as baton_optim
from baton.optim import schedulers as baton_schedulers

mm_optim = pytest.importorskip("mmengine.optim")
mm_schedulers = pytest.importorskip("mmengine.optim.scheduler")
pytestmark = pytest.mark.mmengine

MM = types.SimpleNamespace(
    **{name: getattr(mm_schedulers, name) for name in baton_schedulers.SCHEDULERS},
    OptimWrapper=mm_optim.OptimWrapper,
    AmpOptimWrapper=mm_optim.AmpOptimWrapper,
)
BATON = types.SimpleNamespace(
    **baton_schedulers.SCHEDULERS,
    OptimWrapper=baton_optim.OptimWrapper,
    AmpOptimWrapper=baton_optim.AmpOptimWrapper,
)
SIDES = {"mmengine": MM, "baton": BATON}

# Keyword arguments per scheduler family; the *ParamScheduler twin also gets param_name.
KWARGS = {
    "Step": {"step_size": 2, "gamma": 0.5},
    "MultiStep": {"milestones": [1, 3, 3], "gamma": 0.3},
    "Constant": {"factor": 0.5, "end": 3},
    "Exponential": {"gamma": 0.9},
    "CosineAnnealing": {"T_max": 5, "eta_min": 0.001},
    "Linear": {"start_factor": 0.1, "end": 4},
    "Poly": {"power": 2.0, "eta_min": 1e-4, "end": 8},
    "OneCycle": {"eta_max": 0.5, "total_steps": 12},
    "CosineRestart": {"periods": [3, 4], "restart_weights": [1.0, 0.5], "eta_min": 0.01},
    "ReduceOnPlateau": {"monitor": "loss", "patience": 1, "factor": 0.5, "cooldown": 1},
}
# A validation loss that improves, stalls and improves again.
LOSSES = [1.0, 0.9, 0.95, 0.96, 0.97, 0.98, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
STEPS = len(LOSSES)


def _cases() -> list[tuple[str, dict]]:
    cases = []
    for family, kwargs in KWARGS.items():
        cases.append((f"{family}LR", dict(kwargs)))
        cases.append((f"{family}ParamScheduler", {"param_name": "lr", **kwargs}))
        if family != "OneCycle":  # OneCycle schedules the learning rate only
            cases.append((f"{family}ParamScheduler", {"param_name": "momentum", **kwargs}))
    return cases


CASES = _cases()


def test_every_mmengine_scheduler_is_covered():
    names = {name for name, _ in CASES}
    assert names == set(baton_schedulers.SCHEDULERS)
    assert {"CosineRestartLR", "ReduceOnPlateauLR"} <= names


def _wrapper(ns, groups: int = 2):
    """A wrapper over SGD with ``groups`` param groups (two or more add a base group)."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(groups)])
    params = [{"params": layer.parameters(), "lr": 0.1 * (i + 1)} for i, layer in enumerate(model)]
    return ns.OptimWrapper(torch.optim.SGD(params, lr=0.1, momentum=0.9))


def _record(fn: Callable):
    """``(result, [(category, message)...], exception)`` of ``fn()``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result, error = fn(), None
        except Exception as err:
            result, error = None, err
    seen = [(w.category, str(w.message)) for w in caught if w.category is UserWarning]
    return result, seen, error


def _drive(scheduler, wrapper, steps: int = STEPS) -> list[list[float]]:
    """Step as a training loop does (optimizer, then scheduler); the values after each."""
    name = scheduler.param_name
    seen = []
    for index in range(steps):
        wrapper.step()
        scheduler.step()
        if getattr(scheduler, "need_val_args", False):
            scheduler.step({"loss": LOSSES[index]})
        seen.append([group[name] for group in wrapper.param_groups])
        assert scheduler.get_last_value() == seen[-1]
    return seen


def _comparable(state: dict) -> dict:
    # mmengine keeps OneCycle's bound anneal function in its state; baton keeps the
    # strategy's name, which a weights_only load can read. Both load either.
    return {k: v for k, v in state.items() if k not in ("anneal_func", "anneal_strategy")}


def _both(run: Callable) -> tuple:
    return tuple(_record(lambda ns=ns: run(ns)) for ns in (MM, BATON))


@pytest.mark.parametrize(
    ("name", "kwargs"), CASES, ids=[f"{n}-{k.get('param_name', '')}" for n, k in CASES]
)
def test_values_warnings_and_state_equal_mmengine(name, kwargs):
    def run(ns):
        wrapper = _wrapper(ns)
        scheduler = getattr(ns, name)(wrapper, **copy.deepcopy(kwargs))
        return _drive(scheduler, wrapper), scheduler.state_dict(), wrapper.get_lr()

    (mm, mm_warned, mm_err), (ours, warned, err) = _both(run)
    assert mm_err is None and err is None, (mm_err, err)
    assert ours[0] == mm[0]  # values at every step, the base group's included
    assert _comparable(ours[1]) == _comparable(mm[1])
    assert ours[2] == mm[2]
    assert warned == mm_warned == []


@pytest.mark.parametrize(
    "name", [n for n, k in CASES if n.endswith("LR") and n != "ReduceOnPlateauLR"]
)
def test_iteration_based_twins_equal_mmengine(name):
    kwargs = {k: v for k, v in KWARGS[name.removesuffix("LR")].items() if k != "end"}

    def run(ns):
        wrapper = _wrapper(ns)
        cls = getattr(ns, name)
        scheduler = cls.build_iter_from_epoch(wrapper, epoch_length=3, end=4, **kwargs)
        return _drive(scheduler, wrapper, steps=12), scheduler.state_dict()

    (mm, _, mm_err), (ours, _, err) = _both(run)
    assert mm_err is None and err is None, (mm_err, err)
    assert ours[0] == mm[0]
    assert _comparable(ours[1]) == _comparable(mm[1])


@pytest.mark.parametrize("name", ["CosineRestartLR", "ReduceOnPlateauLR", "OneCycleLR"])
def test_baton_resumes_from_mmengine_scheduler_state(name):
    kwargs = KWARGS[name.removesuffix("LR")]
    mm_wrapper = _wrapper(MM)
    mm = getattr(MM, name)(mm_wrapper, **copy.deepcopy(kwargs))
    _drive(mm, mm_wrapper, steps=5)
    # in a strategy's order: build, then load the optimizer's state, then the scheduler's
    wrapper = _wrapper(BATON)
    ours = getattr(BATON, name)(wrapper, **copy.deepcopy(kwargs))
    wrapper.load_state_dict(copy.deepcopy(mm_wrapper.state_dict()))
    ours.load_state_dict(copy.deepcopy(mm.state_dict()))
    assert _drive(ours, wrapper, steps=5) == _drive(mm, mm_wrapper, steps=5)


# Step-order warnings --------------------------------------------------------------


def _first_steps(order: str, *, target: str = "wrapper", resumed: bool = False):
    def run(ns):
        wrapper = _wrapper(ns, groups=1)
        optimizer = wrapper if target == "wrapper" else wrapper.optimizer
        scheduler = ns.StepLR(optimizer, step_size=1)
        if resumed:
            earlier_wrapper = _wrapper(ns, groups=1)
            earlier = ns.StepLR(earlier_wrapper, step_size=1)
            for _ in range(3):
                earlier_wrapper.step()
                earlier.step()
            scheduler.load_state_dict(earlier.state_dict())
        if order == "overwritten":
            optimizer.step = types.MethodType(lambda self: None, optimizer)
        steps = {
            "optimizer first": [optimizer.step, scheduler.step] * 2,
            "scheduler first": [scheduler.step, optimizer.step] * 2,
            "overwritten": [optimizer.step, scheduler.step] * 2,
        }[order]
        for step in steps:
            step()
        return optimizer._global_step

    return _both(run)


@pytest.mark.parametrize("target", ["wrapper", "optimizer"])
@pytest.mark.parametrize(
    ("order", "resumed", "expected"),
    [
        ("optimizer first", False, None),
        ("scheduler first", False, "Detected call of `scheduler.step()` before"),
        ("overwritten", False, "Seems like `optimizer.step()` has been overridden"),
        # a resumed scheduler (state loaded) is past its first step: no false alarm
        ("scheduler first", True, None),
    ],
)
def test_step_order_warnings_fire_exactly_when_mmengine_s_do(target, order, resumed, expected):
    (mm_count, mm_warned, mm_err), (count, warned, err) = _first_steps(
        order, target=target, resumed=resumed
    )
    assert mm_err is None and err is None, (mm_err, err)
    assert warned == mm_warned
    assert count == mm_count
    if expected is None:
        assert warned == []
    else:
        assert len(warned) == 1 and warned[0][1].startswith(expected)


def test_several_schedulers_wrap_optimizer_step_once():
    for ns in (MM, BATON):
        wrapper = _wrapper(ns, groups=1)
        ns.StepLR(wrapper, step_size=1)
        wrapped = wrapper.step
        ns.ExponentialLR(wrapper, gamma=0.9)
        assert wrapper.step is wrapped and wrapped._with_counter


# Exceptions ------------------------------------------------------------------------

SCHEDULER_ERRORS = {
    "not an optimizer": lambda ns, w: ns.StepLR(object(), step_size=1),
    "end before begin": lambda ns, w: ns.StepLR(w, step_size=1, begin=3, end=3),
    "bad last_step": lambda ns, w: ns.StepLR(w, step_size=1, last_step=-2),
    "resume without initial_lr": lambda ns, w: ns.StepLR(w, step_size=1, last_step=3),
    "convert iteration-based": lambda ns, w: ns.StepLR.build_iter_from_epoch(
        w, step_size=1, by_epoch=False, epoch_length=3
    ),
    "epoch_length 0": lambda ns, w: ns.StepLR.build_iter_from_epoch(w, step_size=1, epoch_length=0),
    "epoch_length None": lambda ns, w: ns.CosineAnnealingLR.build_iter_from_epoch(w, end=3),
    "eta_min and eta_min_ratio": lambda ns, w: ns.CosineAnnealingLR(
        w, eta_min=0.1, eta_min_ratio=0.1
    ),
    "constant factor": lambda ns, w: ns.ConstantLR(w, factor=2.0),
    "linear start_factor": lambda ns, w: ns.LinearLR(w, start_factor=-1.0),
    "linear end_factor": lambda ns, w: ns.LinearLR(w, end_factor=2.0),
    "onecycle momentum": lambda ns, w: ns.OneCycleParamScheduler(w, "momentum"),
    "onecycle total_steps": lambda ns, w: ns.OneCycleLR(w, total_steps=0),
    "onecycle pct_start": lambda ns, w: ns.OneCycleLR(w, total_steps=4, pct_start=2.0),
    "onecycle anneal": lambda ns, w: ns.OneCycleLR(w, total_steps=4, anneal_strategy="x"),
    "onecycle eta_max list": lambda ns, w: ns.OneCycleLR(w, eta_max=[0.1], total_steps=4),
    "onecycle past total": lambda ns, w: [
        scheduler.step() for scheduler in [ns.OneCycleLR(w, total_steps=2)] * 3
    ],
    "restart without eta": lambda ns, w: ns.CosineRestartLR(w, periods=[2]),
    "restart weights": lambda ns, w: ns.CosineRestartLR(
        w, periods=[2, 2], restart_weights=[1.0], eta_min=0.0
    ),
    "plateau by iteration": lambda ns, w: ns.ReduceOnPlateauLR(w, by_epoch=False),
    "plateau factor": lambda ns, w: ns.ReduceOnPlateauLR(w, factor=1.0),
    "plateau min_value": lambda ns, w: ns.ReduceOnPlateauLR(w, min_value=[0.1]),
    "plateau threshold": lambda ns, w: ns.ReduceOnPlateauLR(w, threshold=-1.0),
    "plateau rule": lambda ns, w: ns.ReduceOnPlateauLR(w, rule="more"),
    "plateau threshold_rule": lambda ns, w: ns.ReduceOnPlateauLR(w, threshold_rule="x"),
    "plateau metrics type": lambda ns, w: ns.ReduceOnPlateauLR(w).step([0.5]),
    "plateau monitor": lambda ns, w: ns.ReduceOnPlateauLR(w, monitor="acc").step({"loss": 1}),
}


def _message(err: Exception) -> str:
    return err.args[0] if isinstance(err, KeyError) else str(err)


def _assert_same_error(mm_err, err):
    assert mm_err is not None and err is not None, (mm_err, err)
    assert type(err) is type(mm_err), (mm_err, err)
    # baton's message continues mmengine's words
    assert _message(err).startswith(_message(mm_err)), (_message(mm_err), _message(err))
    assert len(_message(err)) > len(_message(mm_err))


@pytest.mark.parametrize("case", sorted(SCHEDULER_ERRORS))
def test_scheduler_errors_have_mmengine_s_type_and_words(case):
    (_, _, mm_err), (_, _, err) = _both(lambda ns: SCHEDULER_ERRORS[case](ns, _wrapper(ns)))
    _assert_same_error(mm_err, err)


def _sgd():
    return torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)


WRAPPER_ERRORS = {
    "accumulative_counts 0": lambda ns: ns.OptimWrapper(_sgd(), accumulative_counts=0),
    "clip_grad []": lambda ns: ns.OptimWrapper(_sgd(), clip_grad=[]),
    "clip_grad {}": lambda ns: ns.OptimWrapper(_sgd(), clip_grad={}),
    "clip_grad type": lambda ns: ns.OptimWrapper(_sgd(), clip_grad={"type": "x", "max_norm": 1}),
    "clip_grad type only": lambda ns: ns.OptimWrapper(_sgd(), clip_grad={"type": "norm"}),
    "amp loss_scale": lambda ns: ns.AmpOptimWrapper("unknown", optimizer=_sgd()),
    "amp dtype": lambda ns: ns.AmpOptimWrapper(dtype="int8", optimizer=_sgd()),
    "amp optimizer positional": lambda ns: ns.AmpOptimWrapper(_sgd()),
}


@pytest.fixture
def mm_amp_on_cpu(monkeypatch):
    """mmengine's AmpOptimWrapper refuses to be built without an accelerator; pretend one,
    so that its argument handling can be compared here."""
    module = pytest.importorskip("mmengine.optim.optimizer.amp_optimizer_wrapper")
    monkeypatch.setattr(module, "is_cuda_available", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.cuda.amp.GradScaler without CUDA
        yield


@pytest.mark.parametrize("case", sorted(WRAPPER_ERRORS))
def test_wrapper_errors_have_mmengine_s_type_and_words(case, mm_amp_on_cpu):
    (_, _, mm_err), (_, _, err) = _both(WRAPPER_ERRORS[case])
    _assert_same_error(mm_err, err)


def test_clip_grad_arguments_torch_refuses_are_refused_up_front_with_torch_s_type():
    """mmengine accepts ``{'max_nrm': 1}`` and fails at the first clipped step with
    torch's TypeError; baton refuses it when built, with the same type and words."""
    mm = MM.OptimWrapper(_sgd(), clip_grad={"max_nrm": 1.0})
    loss = mm.optimizer.param_groups[0]["params"][0].sum()
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_nrm'") as mm_err:
        mm.update_params(loss)
    with pytest.raises(TypeError) as err:
        BATON.OptimWrapper(_sgd(), clip_grad={"max_nrm": 1.0})
    assert _message(mm_err.value).split(") ", 1)[1] in str(err.value)


def test_clip_grad_of_the_caller_is_not_modified():
    clip = {"type": "value", "clip_value": 0.5}
    BATON.OptimWrapper(_sgd(), clip_grad=clip)
    assert clip == {"type": "value", "clip_value": 0.5}  # mmengine pops 'type'


# Wrappers ---------------------------------------------------------------------------


def _model(ns_seed: int = 0, batch_norm: bool = False) -> nn.Module:
    torch.manual_seed(ns_seed)
    layers = [nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)]
    if batch_norm:
        layers.insert(1, nn.BatchNorm1d(8))
    return nn.Sequential(*layers)


def _train(ns, **wrapper_kwargs):
    model = _model()
    groups = [
        {"params": model[0].parameters()},
        {"params": model[2].parameters(), "lr": 0.05},
    ]
    wrapper = ns.OptimWrapper(torch.optim.SGD(groups, lr=0.1, momentum=0.9), **wrapper_kwargs)
    wrapper.initialize_count_status(model, 0, 5)
    torch.manual_seed(1)
    for _ in range(5):
        with wrapper.optim_context(model):
            loss = model(torch.randn(3, 4)).pow(2).mean()
        wrapper.update_params(loss)
    return model, wrapper


def test_optim_wrapper_trains_and_reports_as_mmengine_s():
    clip = {"max_norm": 0.01}
    (mm, _, mm_err), (ours, _, err) = _both(
        lambda ns: _train(ns, accumulative_counts=2, clip_grad=dict(clip))
    )
    assert mm_err is None and err is None, (mm_err, err)
    (mm_model, mm_wrapper), (model, wrapper) = mm, ours
    for key, value in mm_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert wrapper.get_lr() == mm_wrapper.get_lr()
    assert set(wrapper.get_lr()) == {"base_lr", "lr"}
    assert wrapper.get_momentum() == mm_wrapper.get_momentum()
    assert len(wrapper.param_groups) == len(mm_wrapper.param_groups) == 3
    assert wrapper.clip_grad_kwargs == mm_wrapper.clip_grad_kwargs == clip
    assert wrapper.grad_name == mm_wrapper.grad_name == "grad_norm"
    assert wrapper.message_hub.get_scalar("train/grad_norm") == pytest.approx(
        mm_wrapper.message_hub.get_scalar("train/grad_norm").current()
    )
    state, mm_state = wrapper.state_dict(), mm_wrapper.state_dict()
    assert state.keys() == mm_state.keys() >= {"base_param_settings"}
    base, mm_base = state["base_param_settings"], mm_state["base_param_settings"]
    assert base.keys() == mm_base.keys()
    assert torch.equal(base["params"], mm_base["params"])
    assert {k: v for k, v in base.items() if k != "params"} == {
        k: v for k, v in mm_base.items() if k != "params"
    }


def test_wrapper_state_loads_across_and_is_not_modified():
    _, mm_wrapper = _train(MM)
    _, wrapper = _train(BATON)
    state = mm_wrapper.state_dict()
    keys = set(state)
    wrapper.load_state_dict(state)
    assert set(state) == keys  # mmengine's load pops base_param_settings from the dict
    assert wrapper.base_param_settings is state["base_param_settings"]
    mm_wrapper.load_state_dict(wrapper.state_dict())
    assert mm_wrapper.get_lr() == wrapper.get_lr()


@contextlib.contextmanager
def _mm_log():
    from mmengine.logging import MMLogger

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    mm_logger = MMLogger.get_current_instance()
    mm_logger.addHandler(handler)
    try:
        yield records
    finally:
        mm_logger.removeHandler(handler)


@pytest.mark.parametrize(
    ("init", "max_counts", "counts"),
    [(0, 100, 3), (2, 100, 3), (0, 99, 3), (96, 100, 3), (0, 5, 2), (0, 100, 1), (7, 10, 4)],
)
def test_count_status_is_mmengine_s(init, max_counts, counts):
    """mmengine's ``test_initialize_iter_status`` (``initialize_count_status(model, 0, 100)``
    with ``accumulative_counts=3`` leaves ``_remainder_counts`` at 1), and more windows: the
    counters and the loss factor of every backward pass to the horizon."""

    def run(ns):
        built = ns.OptimWrapper(_sgd(), accumulative_counts=counts)
        built.initialize_count_status(_model(), init, max_counts)
        status = (built._inner_count, built._max_counts, built._remainder_counts)
        factors = []
        for _ in range(init, max_counts):
            factors.append(float(built.scale_loss(torch.tensor(1.0))))
            built._inner_count += 1
        return status, factors

    (mm, _, mm_err), (ours, _, err) = _both(run)
    assert mm_err is None and err is None, (mm_err, err)
    assert ours == mm
    if (init, max_counts, counts) == (0, 100, 3):
        assert ours[0][2] == 1


@pytest.mark.parametrize(
    ("batch_norm", "counts", "init", "expected"),
    [
        (True, 2, 0, "Gradient accumulative may slightly decrease performance"),
        (False, 2, 0, None),
        (True, 1, 0, None),
        (False, 2, 3, "Resumed iteration number is not divisible by `_accumulative_counts`"),
    ],
)
def test_count_status_warnings_are_mmengine_s(caplog, batch_norm, counts, init, expected):
    with _mm_log() as mm_records:
        MM.OptimWrapper(_sgd(), accumulative_counts=counts).initialize_count_status(
            _model(batch_norm=batch_norm), init, 10
        )
    with caplog.at_level(logging.WARNING, logger="baton.optim"):
        BATON.OptimWrapper(_sgd(), accumulative_counts=counts).initialize_count_status(
            _model(batch_norm=batch_norm), init, 10
        )
    mm_messages = [r.getMessage() for r in mm_records]
    # baton's log channel is the ``baton.optim`` logger; the words are mmengine's
    messages = [r.getMessage() for r in caplog.records if r.name == "baton.optim"]
    assert len(messages) == len(mm_messages) == (0 if expected is None else 1)
    for message, mm_message in zip(messages, mm_messages, strict=True):
        assert message.startswith(mm_message) and mm_message.startswith(expected)


@pytest.mark.parametrize(
    "build",
    [
        lambda ns, opt: ns.AmpOptimWrapper("dynamic", optimizer=opt),
        lambda ns, opt: ns.AmpOptimWrapper(loss_scale=512.0, optimizer=opt),
        lambda ns, opt: ns.AmpOptimWrapper(loss_scale={"init_scale": 4.0}, optimizer=opt),
        lambda ns, opt: ns.AmpOptimWrapper(dtype="float32", optimizer=opt),
        lambda ns, opt: ns.AmpOptimWrapper(dtype="float64", optimizer=opt),
        lambda ns, opt: ns.AmpOptimWrapper(dtype=torch.bfloat16, optimizer=opt, clip_grad=None),
        lambda ns, opt: ns.AmpOptimWrapper(optimizer=opt, accumulative_counts=2),
    ],
    ids=["dynamic", "static", "dict", "float32", "float64", "bfloat16", "accumulation"],
)
def test_amp_wrapper_takes_mmengine_s_arguments(build, mm_amp_on_cpu):
    (mm, _, mm_err), (ours, _, err) = _both(lambda ns: build(ns, _sgd()))
    assert mm_err is None and err is None, (mm_err, err)
    assert ours.cast_dtype == mm.cast_dtype
    assert ours._scale_update_param == mm._scale_update_param
    assert ours._accumulative_counts == mm._accumulative_counts
    assert ours.state_dict().keys() == mm.state_dict().keys() >= {"loss_scaler"}
    assert ours.base_param_settings is None and mm.base_param_settings is None


def test_amp_on_the_cpu_autocasts_to_bfloat16_as_mmengine_s_does(mm_amp_on_cpu):
    def run(ns):
        model = _model()
        wrapper = ns.AmpOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        with wrapper.optim_context(model):
            out = model(torch.randn(2, 4))
        wrapper.update_params(out.float().pow(2).mean())
        return out.dtype, model.state_dict()

    (mm, _, mm_err), (ours, _, err) = _both(run)
    assert mm_err is None and err is None, (mm_err, err)
    assert ours[0] == mm[0] == torch.bfloat16
    for key, value in mm[1].items():
        assert torch.equal(ours[1][key], value)


def test_amp_autocasts_where_the_model_is_when_the_context_is_entered():
    model = _model()
    # built over parameters elsewhere (here: the meta device), entered with a CPU model
    elsewhere = [p.detach().to("meta") for p in model.parameters()]
    wrapper = BATON.AmpOptimWrapper(optimizer=torch.optim.SGD(elsewhere, lr=0.1))
    with wrapper.optim_context(model):
        assert model(torch.randn(2, 4)).dtype == torch.bfloat16


def test_a_state_saved_before_the_base_group_existed_still_resumes():
    """Schedulers saved by baton before its wrapper had mmengine's base group hold one
    value per real param group; they resume, and the real groups continue exactly."""
    wrapper = _wrapper(BATON)
    scheduler = BATON.CosineAnnealingLR(wrapper, T_max=5)
    for _ in range(2):
        wrapper.step()
        scheduler.step()
    old = copy.deepcopy(scheduler.state_dict())
    old["base_values"], old["_last_value"] = old["base_values"][:-1], old["_last_value"][:-1]
    old_optimizer = copy.deepcopy(wrapper.state_dict())
    del old_optimizer["base_param_settings"]
    expected = _drive(scheduler, wrapper, steps=3)
    again = _wrapper(BATON)
    resumed = BATON.CosineAnnealingLR(again, T_max=5)
    again.load_state_dict(old_optimizer)
    resumed.load_state_dict(old)
    resumed_values = _drive(resumed, again, steps=3)
    assert [v[:-1] for v in resumed_values] == [v[:-1] for v in expected]
