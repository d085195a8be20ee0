"""Parameter schedulers with mmengine's names, arguments and semantics.

Each scheduler updates one hyper-parameter (``lr`` for the ``*LR`` classes) of every
param group, in mmengine's chainable form, inside ``[begin, end)`` measured in epochs
(``by_epoch=True``) or iterations. ``convert_to_iter_based=True`` in a config turns an
epoch-based schedule into the same curve stepped every iteration. For the same config,
the value at every step equals mmengine's (a test compares them step by step), and the
state dicts use mmengine's attribute names, so checkpoints resume in either library.

Errors and warnings are mmengine's too: the same exception types, each message starting
with mmengine's words (code and tests that match them keep working) and going on to say
what to do. Building a scheduler wraps ``optimizer.step`` with a counter, as mmengine
does, so that stepping a scheduler before the optimizer's first step warns.
``docs/mmengine.md`` lists the few deliberate differences.
"""

import logging
import math
import warnings
import weakref
from collections.abc import Callable, Sequence
from functools import wraps

from torch.optim import Optimizer

from baton.optim import OptimWrapper

logger = logging.getLogger(__name__)

INF = int(1e9)


class _ParamScheduler:
    """Base class: steps a value inside ``[begin, end)``; subclasses give ``_get_value``."""

    # Constructor arguments counted in epochs, scaled by convert_to_iter_based.
    _epoch_args: tuple[str, ...] = ()

    def __init__(
        self,
        optimizer,
        param_name: str,
        begin: int = 0,
        end: int = INF,
        last_step: int = -1,
        by_epoch: bool = True,
        verbose: bool = False,
    ):
        _check_optimizer(optimizer)
        _check_range(begin, end)
        self.optimizer = optimizer
        self.param_name = param_name
        self.begin = begin
        self.end = end
        self.by_epoch = by_epoch
        _record_initial_values(optimizer, param_name, last_step)
        self.base_values = [group[f"initial_{param_name}"] for group in optimizer.param_groups]
        self.last_step = last_step
        # mmengine (after torch, pytorch#20124) counts optimizer.step() calls to warn
        # when a scheduler steps first, the commonest ordering bug in training loops.
        optimizer.step = _with_counter(optimizer.step)
        optimizer._global_step = -1
        self._global_step = -1
        self.verbose = verbose
        self.step()

    @classmethod
    def build_iter_from_epoch(
        cls,
        *args,
        begin: int = 0,
        end: int = INF,
        by_epoch: bool = True,
        epoch_length: int | None = None,
        **kwargs,
    ):
        """Build the iteration-based twin of an epoch-based config.

        Raises:
            AssertionError: ``by_epoch`` is false, or ``epoch_length`` is not a positive
                int (mmengine's exception type; mmengine also takes a float).
        """
        _check_convertible(by_epoch, epoch_length)
        for name in cls._epoch_args:
            value = kwargs.get(name)
            if isinstance(value, (list, tuple)):
                kwargs[name] = [v * epoch_length for v in value]
            elif value is not None:
                kwargs[name] = value * epoch_length
        begin = int(begin * epoch_length)
        if end != INF:
            end = int(end * epoch_length)
        return cls(*args, begin=begin, end=end, by_epoch=False, **kwargs)

    def state_dict(self) -> dict:
        """Every attribute but the optimizer (mmengine's layout)."""
        return {key: value for key, value in self.__dict__.items() if key != "optimizer"}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore attributes; keys this class does not have (mmengine's bound
        ``anneal_func``, say) are ignored, so a hostile state cannot plant attributes."""
        for key, value in state_dict.items():
            if key in self.__dict__ and key != "optimizer":
                if key == "milestones":
                    value = dict(value)
                self.__dict__[key] = value
            else:
                logger.debug("ignoring scheduler state key %r", key)
        self._add_base_group_values()

    def _add_base_group_values(self) -> None:
        # A state saved before baton's wrapper had mmengine's base group (two or more
        # param groups) has one value per group fewer: the base group gets its own
        # current values, so the real groups resume exactly.
        groups = self.optimizer.param_groups
        if getattr(self.optimizer, "base_param_settings", None) is None:
            return
        base = groups[-1]
        for key, missing in (
            ("base_values", base.get(f"initial_{self.param_name}")),
            ("_last_value", base.get(self.param_name)),
            ("min_values", None),
        ):
            values = self.__dict__.get(key)
            if isinstance(values, list) and values and len(values) == len(groups) - 1:
                values.append(values[-1] if missing is None else missing)

    def get_last_value(self) -> list[float]:
        """The value of each param group after the last step."""
        return self._last_value

    def _get_value(self) -> list[float]:
        raise NotImplementedError

    def _current(self) -> list[float]:
        return [group[self.param_name] for group in self.optimizer.param_groups]

    def step(self) -> None:
        """Advance one epoch or iteration and write the new values into the param groups.

        Warns (``UserWarning``, mmengine's words) when called for the first time after
        building before any ``optimizer.step()``, or when ``optimizer.step`` was replaced
        after this scheduler was built.
        """
        if self._global_step == 0:
            _warn_step_order(self.optimizer)
        self._global_step += 1
        if self.begin <= self._global_step < self.end:
            self.last_step += 1
            for index, (group, value) in enumerate(
                zip(self.optimizer.param_groups, self._get_value(), strict=True)
            ):
                group[self.param_name] = value
                if self.verbose:
                    logger.info("param group %d: %s set to %.4e", index, self.param_name, value)
        self._last_value = self._current()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(begin={self.begin}, end={self.end}, "
            f"by_epoch={self.by_epoch}, last_step={self.last_step})"
        )


def _check_optimizer(optimizer) -> None:
    # mmengine takes an Optimizer or one of its own wrappers; baton cannot import
    # mmengine, so an object wrapping an Optimizer in ``.optimizer`` counts as a wrapper.
    if isinstance(optimizer, (Optimizer, OptimWrapper)) or isinstance(
        getattr(optimizer, "optimizer", None), Optimizer
    ):
        return
    # mmengine's words verbatim (its missing space included), then what to pass.
    raise TypeError(
        f"``optimizer`` should be an Optimizer,but got {type(optimizer).__name__}; pass a "
        "torch.optim.Optimizer or the OptimWrapper that SingleDeviceStrategy.prepare returns"
    )


def _check_range(begin: int, end: int) -> None:
    if end <= begin:
        raise ValueError(
            f"end should be larger than begin, but got begin={begin}, end={end}; the "
            "scheduler acts on steps begin <= step < end"
        )


def _record_initial_values(optimizer, param_name: str, last_step: int) -> None:
    """Store ``initial_<param>`` in each group (fresh start) or check it is there (resume)."""
    if not isinstance(last_step, int) or isinstance(last_step, bool) or last_step < -1:
        raise AssertionError(
            f"last_step must be an int >= -1 (-1: not stepped yet), got {last_step!r}"
        )
    if last_step == -1:
        for group in optimizer.param_groups:
            group.setdefault(f"initial_{param_name}", group[param_name])
        return
    for index, group in enumerate(optimizer.param_groups):
        if f"initial_{param_name}" not in group:
            raise KeyError(
                f"param 'initial_{param_name}' is not specified in param_groups[{index}] "
                "when resuming an optimizer; load the optimizer's state before building "
                "schedulers with last_step, or build them with last_step=-1 and load their "
                "state_dict"
            )


def _check_convertible(by_epoch: bool, epoch_length) -> None:
    if not by_epoch:
        raise AssertionError(
            "Only epoch-based kwargs whose `by_epoch=True` can be converted to iter-based. "
            "Drop convert_to_iter_based, or set by_epoch=True"
        )
    if not isinstance(epoch_length, int) or isinstance(epoch_length, bool) or epoch_length <= 0:
        raise AssertionError(
            f"`epoch_length` must be a positive integer, but got {epoch_length}. "
            "convert_to_iter_based needs the iterations of one epoch "
            "(dispatch_kwargs['epoch_length'])"
        )


def _with_counter(method: Callable) -> Callable:
    """``optimizer.step`` that also counts its calls in ``optimizer._global_step``.

    As mmengine: a weak reference to the optimizer (no reference cycle), and a marker so
    that several schedulers on one optimizer wrap it once.
    """
    if getattr(method, "_with_counter", False):
        return method
    instance_ref = weakref.ref(method.__self__)
    func = method.__func__
    cls = type(method.__self__)
    del method

    @wraps(func)
    def wrapper(*args, **kwargs):
        instance = instance_ref()
        instance._global_step += 1
        return func.__get__(instance, cls)(*args, **kwargs)

    wrapper._with_counter = True
    return wrapper


def _warn_step_order(optimizer) -> None:
    """mmengine's two warnings about the first ``scheduler.step()``, in its words."""
    if not hasattr(optimizer.step, "_with_counter"):
        warnings.warn(
            "Seems like `optimizer.step()` has been overridden after parameter value "
            "scheduler initialization. Please, make sure to call `optimizer.step()` before "
            "`scheduler.step()`. See more details at "
            "https://pytorch.org/docs/stable/optim.html#how-to-adjust-learning-rate",
            UserWarning,
            stacklevel=3,
        )
    elif optimizer._global_step < 0:
        warnings.warn(
            "Detected call of `scheduler.step()` before `optimizer.step()`. In PyTorch "
            "1.1.0 and later, you should call them in the opposite order: "
            "`optimizer.step()` before `scheduler.step()`. Failure to do this will result "
            "in PyTorch skipping the first value of the parameter value schedule. See more "
            "details at https://pytorch.org/docs/stable/optim.html#how-to-adjust-learning-rate",
            UserWarning,
            stacklevel=3,
        )


class StepParamScheduler(_ParamScheduler):
    """Multiply by ``gamma`` every ``step_size`` steps."""

    _epoch_args = ("step_size",)

    def __init__(self, optimizer, param_name: str, step_size: int, gamma: float = 0.1, **kwargs):
        self.step_size = step_size
        self.gamma = gamma
        super().__init__(optimizer, param_name, **kwargs)

    def _get_value(self):
        if self.last_step == 0 or self.last_step % self.step_size != 0:
            return self._current()
        return [v * self.gamma for v in self._current()]


class MultiStepParamScheduler(_ParamScheduler):
    """Multiply by ``gamma`` at each milestone."""

    _epoch_args = ("milestones",)

    def __init__(
        self, optimizer, param_name: str, milestones: list[int], gamma: float = 0.1, **kwargs
    ):
        counts: dict[int, int] = {}
        for milestone in milestones:
            counts[milestone] = counts.get(milestone, 0) + 1
        self.milestones = counts
        self.gamma = gamma
        super().__init__(optimizer, param_name, **kwargs)

    def _get_value(self):
        if self.last_step not in self.milestones:
            return self._current()
        factor = self.gamma ** self.milestones[self.last_step]
        return [v * factor for v in self._current()]


class ConstantParamScheduler(_ParamScheduler):
    """Multiply by ``factor`` until ``end``, then restore."""

    def __init__(self, optimizer, param_name: str, factor: float = 1.0 / 3, **kwargs):
        if not 0 <= factor <= 1:
            raise ValueError(
                f"Constant multiplicative factor should between 0 and 1. Got factor={factor}; "
                "ConstantLR multiplies the value by it until 'end'"
            )
        self.factor = factor
        self.total_iters = kwargs.get("end", INF) - kwargs.get("begin", 0) - 1
        super().__init__(optimizer, param_name, **kwargs)

    def _get_value(self):
        if self.last_step == 0:
            return [v * self.factor for v in self._current()]
        if self.last_step != self.total_iters:
            return self._current()
        return [v * (1.0 / self.factor) for v in self._current()]


class ExponentialParamScheduler(_ParamScheduler):
    """Multiply by ``gamma`` every step."""

    def __init__(self, optimizer, param_name: str, gamma: float, **kwargs):
        self.gamma = gamma
        super().__init__(optimizer, param_name, **kwargs)

    def _get_value(self):
        if self.last_step == 0:
            return self._current()
        return [v * self.gamma for v in self._current()]


class CosineAnnealingParamScheduler(_ParamScheduler):
    """Cosine annealing from the initial value to ``eta_min`` over ``T_max`` steps."""

    _epoch_args = ("T_max",)

    def __init__(
        self,
        optimizer,
        param_name: str,
        T_max: int | None = None,
        eta_min: float | None = None,
        begin: int = 0,
        end: int = INF,
        eta_min_ratio: float | None = None,
        **kwargs,
    ):
        if eta_min is None and eta_min_ratio is None:
            eta_min = 0.0
        if eta_min is not None and eta_min_ratio is not None:
            raise AssertionError(
                "Either `eta_min` or `eta_min_ratio should be specified; got both "
                f"(eta_min={eta_min}, eta_min_ratio={eta_min_ratio}): keep one"
            )
        self.T_max = T_max or end - begin
        self.eta_min = eta_min
        self.eta_min_ratio = eta_min_ratio
        super().__init__(optimizer, param_name, begin=begin, end=end, **kwargs)

    def _eta_min(self, base_value: float) -> float:
        return self.eta_min if self.eta_min_ratio is None else base_value * self.eta_min_ratio

    def _get_value(self):
        current = self._current()
        if self.last_step == 0:
            return current
        if (self.last_step - 1 - self.T_max) % (2 * self.T_max) == 0:
            return [
                value + (base - self._eta_min(base)) * (1 - math.cos(math.pi / self.T_max)) / 2
                for base, value in zip(self.base_values, current, strict=True)
            ]
        ratio = (1 + math.cos(math.pi * self.last_step / self.T_max)) / (
            1 + math.cos(math.pi * (self.last_step - 1) / self.T_max)
        )
        return [
            ratio * (value - self._eta_min(base)) + self._eta_min(base)
            for base, value in zip(self.base_values, current, strict=True)
        ]


class LinearParamScheduler(_ParamScheduler):
    """Scale linearly from ``start_factor`` to ``end_factor`` of the value (warmup)."""

    def __init__(
        self,
        optimizer,
        param_name: str,
        start_factor: float = 1.0 / 3,
        end_factor: float = 1.0,
        **kwargs,
    ):
        if not 0 <= start_factor <= 1:
            raise ValueError(
                "Starting multiplicative factor should between 0 and 1. "
                f"Got start_factor={start_factor}"
            )
        if not 0 <= end_factor <= 1:
            raise ValueError(
                f"Ending multiplicative factor should between 0 and 1. Got end_factor={end_factor}"
            )
        self.start_factor = start_factor
        self.end_factor = end_factor
        self.total_iters = kwargs.get("end", INF) - kwargs.get("begin", 0) - 1
        super().__init__(optimizer, param_name, **kwargs)

    def _get_value(self):
        if self.last_step == 0:
            return [v * self.start_factor for v in self._current()]
        delta = self.end_factor - self.start_factor
        factor = 1.0 + delta / (self.total_iters * self.start_factor + (self.last_step - 1) * delta)
        return [v * factor for v in self._current()]


class PolyParamScheduler(_ParamScheduler):
    """Polynomial decay to ``eta_min``."""

    def __init__(
        self, optimizer, param_name: str, eta_min: float = 0, power: float = 1.0, **kwargs
    ):
        self.eta_min = eta_min
        self.power = power
        self.total_iters = kwargs.get("end", INF) - kwargs.get("begin", 0) - 1
        super().__init__(optimizer, param_name, **kwargs)

    def _get_value(self):
        if self.last_step == 0:
            return self._current()
        factor = (1 - 1 / (self.total_iters - self.last_step + 1)) ** self.power
        return [(v - self.eta_min) * factor + self.eta_min for v in self._current()]


class OneCycleParamScheduler(_ParamScheduler):
    """The 1cycle policy (not chainable): warm up to ``eta_max``, then anneal far below."""

    _epoch_args = ("total_steps",)

    def __init__(
        self,
        optimizer,
        param_name: str,
        eta_max: float | list[float] = 0,
        total_steps: int | None = None,
        pct_start: float = 0.3,
        anneal_strategy: str = "cos",
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        three_phase: bool = False,
        begin: int = 0,
        end: int = INF,
        last_step: int = -1,
        **kwargs,
    ):
        if param_name != "lr":
            # mmengine's words, its typo included, so that code matching them still does.
            raise AssertionError(
                "OneCycle only works for learning rate updating, but got patam_name as "
                f"{param_name}; use OneCycleLR, or another scheduler for {param_name!r}"
            )
        self.eta_max = eta_max
        self.div_factor = div_factor
        self.final_div_factor = final_div_factor
        if total_steps is not None:
            if not isinstance(total_steps, int) or total_steps <= 0:
                raise ValueError(
                    f"Expected positive integer total_steps, but got {total_steps}; "
                    "leave it unset to use end - begin"
                )
            self.total_steps = total_steps
        else:
            self.total_steps = end - begin
        if not isinstance(pct_start, float) or not 0 <= pct_start <= 1:
            raise ValueError(
                f"Expected float between 0 and 1 pct_start, but got {pct_start} "
                "(write 0.3, not 30 or '30%')"
            )
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(
                f'anneal_strategy must by one of "cos" or "linear", instead got {anneal_strategy}; '
                "'cos' anneals along a half cosine, 'linear' along a straight line"
            )
        self.anneal_strategy = anneal_strategy
        p = param_name
        if three_phase:
            phases = [
                (float(pct_start * self.total_steps) - 1, "initial", "max"),
                (float(2 * pct_start * self.total_steps) - 2, "max", "initial"),
                (self.total_steps - 1, "initial", "min"),
            ]
        else:
            phases = [
                (float(pct_start * self.total_steps) - 1, "initial", "max"),
                (self.total_steps - 1, "max", "min"),
            ]
        self._schedule_phases = [
            {"end_step": e, f"start_{p}": f"{s}_{p}", f"end_{p}": f"{t}_{p}"} for e, s, t in phases
        ]
        groups = optimizer.param_groups
        if isinstance(eta_max, (list, tuple)):
            if len(eta_max) != len(groups):
                raise ValueError(
                    f"expected {len(groups)} values for max_{p}, got {len(eta_max)}: give "
                    "eta_max one value per param group, or a single number for all"
                )
            max_values = list(eta_max)
        else:
            max_values = [eta_max] * len(groups)
        if last_step == -1:
            for index, group in enumerate(groups):
                group[f"initial_{p}"] = max_values[index] / div_factor
                group[f"max_{p}"] = max_values[index]
                group[f"min_{p}"] = group[f"initial_{p}"] / final_div_factor
        super().__init__(optimizer, param_name, begin=begin, end=end, last_step=last_step, **kwargs)

    @staticmethod
    def _anneal(strategy: str, start: float, end: float, pct: float) -> float:
        if strategy == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def _get_value(self):
        step = self.last_step
        if step > self.total_steps:
            raise ValueError(
                f"Tried to step {step + 1} times. The specified number of total steps is "
                f"{self.total_steps}; set total_steps (or end) to the run's length"
            )
        values = []
        for group in self.optimizer.param_groups:
            start_step = 0
            for index, phase in enumerate(self._schedule_phases):
                end_step = phase["end_step"]
                if step <= end_step or index == len(self._schedule_phases) - 1:
                    pct = (step - start_step) / (end_step - start_step)
                    start = group[phase["start_" + self.param_name]]
                    end = group[phase["end_" + self.param_name]]
                    values.append(self._anneal(self.anneal_strategy, start, end, pct))
                    break
                start_step = phase["end_step"]
        return values


class CosineRestartParamScheduler(_ParamScheduler):
    """Cosine annealing with restarts: anneal to ``eta_min`` over each of ``periods``, then
    restart from the initial value times that period's ``restart_weights`` entry."""

    _epoch_args = ("periods",)

    def __init__(
        self,
        optimizer,
        param_name: str,
        periods: list[int],
        restart_weights: Sequence[float] = (1,),
        eta_min: float | None = None,
        eta_min_ratio: float | None = None,
        **kwargs,
    ):
        if (eta_min is None) == (eta_min_ratio is None):
            raise AssertionError(
                "Either `eta_min` or `eta_min_ratio` should be specified, not both and not "
                f"neither; got eta_min={eta_min}, eta_min_ratio={eta_min_ratio}"
            )
        self.periods = periods
        self.eta_min = eta_min
        self.eta_min_ratio = eta_min_ratio
        self.restart_weights = restart_weights
        if len(periods) != len(restart_weights):
            raise AssertionError(
                "periods and restart_weights should have the same length. Got "
                f"{len(periods)} periods and {len(restart_weights)} restart_weights: give "
                "one weight per period"
            )
        self.cumulative_periods = [sum(periods[: i + 1]) for i in range(len(periods))]
        super().__init__(optimizer, param_name, **kwargs)

    def _get_value(self):
        index = next(
            (i for i, edge in enumerate(self.cumulative_periods) if self.last_step < edge), None
        )
        if index is None:  # past the last period: hold the value
            return self._current()
        weight = self.restart_weights[index]
        period = self.periods[index]
        step = self.last_step - (self.cumulative_periods[index - 1] if index else 0)
        values = []
        for base, value in zip(self.base_values, self._current(), strict=True):
            eta_max = base * weight
            eta_min = self.eta_min if self.eta_min_ratio is None else base * self.eta_min_ratio
            if step == 0:
                values.append(eta_max)
            else:
                ratio = (1 + math.cos(math.pi * step / period)) / (
                    1 + math.cos(math.pi * (step - 1) / period)
                )
                values.append(ratio * (value - eta_min) + eta_min)
        return values


class ReduceOnPlateauParamScheduler(_ParamScheduler):
    """Multiply by ``factor`` when the validation metric ``monitor`` stops improving.

    Stepped twice per epoch, as mmengine's scheduler hook does: ``step()`` after each
    training epoch only counts it; ``step(metrics)`` after each validation compares
    ``metrics[monitor]`` with the best so far and, after more than ``patience`` bad
    validations, reduces the value. Its whole state (best value, bad epochs, cooldown)
    is in ``state_dict()``, so a resumed run reduces exactly where an uninterrupted one
    does. Epoch-based only.
    """

    need_val_args = True

    def __init__(
        self,
        optimizer,
        param_name: str,
        monitor: str = "loss",
        rule: str = "less",
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        threshold_rule: str = "rel",
        cooldown: int = 0,
        min_value: float | Sequence[float] = 0.0,
        eps: float = 1e-8,
        begin: int = 0,
        end: int = INF,
        last_step: int = -1,
        by_epoch: bool = True,
        verbose: bool = False,
    ):
        # No super().__init__: like mmengine's, this scheduler neither steps when built
        # nor wraps optimizer.step (it follows validations, not optimizer updates).
        _check_optimizer(optimizer)
        self.optimizer = optimizer
        self.param_name = param_name
        _check_range(begin, end)
        self.begin = begin
        self.end = end
        if not by_epoch:
            raise AssertionError(self._epoch_only_message())
        self.by_epoch = by_epoch
        _record_initial_values(optimizer, param_name, last_step)
        self.last_step = last_step
        self._global_step = 0
        self.verbose = verbose
        if factor >= 1.0:
            raise ValueError(f"Factor should be < 1.0. Got factor={factor}")
        self.factor = factor
        # The wrapper's extra base group (two or more param groups) gets the last group's
        # minimum, as in mmengine.
        raw_groups = getattr(optimizer, "optimizer", optimizer).param_groups
        if isinstance(min_value, (list, tuple)):
            if len(min_value) != len(raw_groups):
                raise ValueError(
                    f"expected {len(raw_groups)} min_lrs, got {len(min_value)}: give "
                    "min_value one value per param group, or a single number for all"
                )
            self.min_values = list(min_value)
            if getattr(optimizer, "base_param_settings", None) is not None:
                self.min_values.append(self.min_values[-1])
        else:
            self.min_values = [min_value] * len(optimizer.param_groups)
        self.patience = patience
        self.cooldown = cooldown
        self.cooldown_counter = 0
        self.num_bad_epochs = 0
        self.eps = eps
        self.monitor = monitor
        if threshold < 0:
            raise ValueError(
                f"threshold {threshold} should be >= 0. It is the least change that counts "
                "as an improvement (relative or absolute, by threshold_rule)"
            )
        if rule not in ("less", "greater"):
            raise ValueError(f"mode {rule} is unknown! Use rule='less' or rule='greater'")
        if threshold_rule not in ("rel", "abs"):
            raise ValueError(
                f"threshold mode {threshold_rule} is unknown! Use threshold_rule='rel' or 'abs'"
            )
        self.rule_worse = INF if rule == "less" else -INF
        self.rule = rule
        self.threshold = threshold
        self.threshold_rule = threshold_rule
        self.best = self.rule_worse
        self._last_value = self._current()

    @classmethod
    def _epoch_only_message(cls) -> str:
        return (
            f"Now {cls.__name__} only support by_epoch=True: it follows validations, which "
            "come once per epoch; drop by_epoch and convert_to_iter_based"
        )

    @classmethod
    def build_iter_from_epoch(cls, *args, **kwargs):
        """Refused: a plateau scheduler follows validations, not iterations."""
        raise AssertionError(cls._epoch_only_message())

    def step(self, metrics: dict | None = None) -> None:
        """Count a training epoch (no ``metrics``), or judge a validation's ``metrics``.

        Raises:
            TypeError: ``metrics`` is not a dict.
            KeyError: ``metrics`` has no ``monitor`` key.
        """
        if metrics is None:
            self._global_step += 1
            return
        if not isinstance(metrics, dict):
            raise TypeError(
                f"metrics type should be dict, but got type {type(metrics)}; pass the "
                "validation metrics, e.g. {'loss': 0.3}"
            )
        if self.begin <= self._global_step < self.end:
            self.last_step += 1
            if self.monitor not in metrics:
                # mmengine's words, typo included, then the fix.
                raise KeyError(
                    f"Excepted key in {list(metrics)}, but got key {self.monitor} is not in "
                    "dict; set monitor to one of those keys"
                )
            metric = float(metrics[self.monitor])
            if self._is_better(metric, self.best):
                self.best = metric
                self.num_bad_epochs = 0
            else:
                self.num_bad_epochs += 1
            if self.cooldown_counter > 0:
                self.cooldown_counter -= 1
                self.num_bad_epochs = 0  # bad epochs in cooldown do not count
            if self.num_bad_epochs > self.patience:
                for index, (group, value) in enumerate(
                    zip(self.optimizer.param_groups, self._get_value(), strict=True)
                ):
                    if group[self.param_name] - value > self.eps:
                        group[self.param_name] = value
                        if self.verbose:
                            logger.info(
                                "param group %d: %s set to %.4e in epoch %d",
                                index,
                                self.param_name,
                                value,
                                self.last_step,
                            )
                self.cooldown_counter = self.cooldown
                self.num_bad_epochs = 0
        self._last_value = self._current()

    def _get_value(self):
        return [
            max(float(group[self.param_name]) * self.factor, minimum)
            for group, minimum in zip(self.optimizer.param_groups, self.min_values, strict=True)
        ]

    def _is_better(self, value: float, best: float) -> bool:
        if self.rule == "less":
            if self.threshold_rule == "rel":
                return value < best * (1.0 - self.threshold)
            return value < best - self.threshold
        if self.threshold_rule == "rel":
            return value > best * (1.0 + self.threshold)
        return value > best + self.threshold


def _lr_variant(base: type) -> type:
    """The ``*LR`` class of a param scheduler: the same schedule applied to ``lr``."""

    def __init__(self, optimizer, *args, **kwargs):
        base.__init__(self, optimizer, "lr", *args, **kwargs)

    name = base.__name__.replace("ParamScheduler", "LR")
    doc = f"{base.__doc__} Applied to the learning rate (mmengine's ``{name}``)."
    return type(name, (base,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


StepLR = _lr_variant(StepParamScheduler)
MultiStepLR = _lr_variant(MultiStepParamScheduler)
ConstantLR = _lr_variant(ConstantParamScheduler)
ExponentialLR = _lr_variant(ExponentialParamScheduler)
CosineAnnealingLR = _lr_variant(CosineAnnealingParamScheduler)
LinearLR = _lr_variant(LinearParamScheduler)
PolyLR = _lr_variant(PolyParamScheduler)
OneCycleLR = _lr_variant(OneCycleParamScheduler)
CosineRestartLR = _lr_variant(CosineRestartParamScheduler)
ReduceOnPlateauLR = _lr_variant(ReduceOnPlateauParamScheduler)

SCHEDULERS: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        StepParamScheduler,
        MultiStepParamScheduler,
        ConstantParamScheduler,
        ExponentialParamScheduler,
        CosineAnnealingParamScheduler,
        LinearParamScheduler,
        PolyParamScheduler,
        OneCycleParamScheduler,
        CosineRestartParamScheduler,
        ReduceOnPlateauParamScheduler,
        StepLR,
        MultiStepLR,
        ConstantLR,
        ExponentialLR,
        CosineAnnealingLR,
        LinearLR,
        PolyLR,
        OneCycleLR,
        CosineRestartLR,
        ReduceOnPlateauLR,
    )
}
