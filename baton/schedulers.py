"""Parameter schedulers with mmengine's names, arguments and semantics.

Each scheduler updates one hyper-parameter (``lr`` for the ``*LR`` classes) of every
param group, in mmengine's chainable form, inside ``[begin, end)`` measured in epochs
(``by_epoch=True``) or iterations. ``convert_to_iter_based=True`` in a config turns an
epoch-based schedule into the same curve stepped every iteration. For the same config,
the value at every step equals mmengine's (a test compares them step by step), and the
state dicts use mmengine's attribute names, so checkpoints resume in either library.
"""

import logging
import math

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
        if not hasattr(optimizer, "param_groups"):
            raise TypeError(
                f"optimizer must be an Optimizer or OptimWrapper, got {type(optimizer).__name__}"
            )
        if end <= begin:
            raise ValueError(f"end must be larger than begin, got begin={begin}, end={end}")
        if not isinstance(last_step, int) or last_step < -1:
            raise ValueError(f"last_step must be an int >= -1, got {last_step!r}")
        self.optimizer = optimizer
        self.param_name = param_name
        self.begin = begin
        self.end = end
        self.by_epoch = by_epoch
        if last_step == -1:
            for group in optimizer.param_groups:
                group.setdefault(f"initial_{param_name}", group[param_name])
        else:
            for index, group in enumerate(optimizer.param_groups):
                if f"initial_{param_name}" not in group:
                    raise KeyError(
                        f"param_groups[{index}] has no 'initial_{param_name}'; resume the "
                        "optimizer state before building schedulers with last_step"
                    )
        self.base_values = [group[f"initial_{param_name}"] for group in optimizer.param_groups]
        self.last_step = last_step
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
        """Build the iteration-based twin of an epoch-based config."""
        if not by_epoch:
            raise ValueError("only an epoch-based scheduler (by_epoch=True) can be converted")
        if not isinstance(epoch_length, int) or epoch_length <= 0:
            raise ValueError(
                "convert_to_iter_based needs a positive epoch_length (the iterations of one "
                f"epoch, dispatch_kwargs['epoch_length']), got {epoch_length!r}"
            )
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
        ``anneal_func``, say) are ignored."""
        for key, value in state_dict.items():
            if key in self.__dict__ and key != "optimizer":
                if key == "milestones":
                    value = dict(value)
                self.__dict__[key] = value
            else:
                logger.debug("ignoring scheduler state key %r", key)

    def get_last_value(self) -> list[float]:
        """The value of each param group after the last step."""
        return self._last_value

    def _get_value(self) -> list[float]:
        raise NotImplementedError

    def _current(self) -> list[float]:
        return [group[self.param_name] for group in self.optimizer.param_groups]

    def step(self) -> None:
        """Advance one epoch or iteration and write the new values into the param groups."""
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
            raise ValueError(f"factor must be between 0 and 1, got {factor}")
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
            raise ValueError("give either eta_min or eta_min_ratio, not both")
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
            raise ValueError(f"start_factor must be between 0 and 1, got {start_factor}")
        if not 0 <= end_factor <= 1:
            raise ValueError(f"end_factor must be between 0 and 1, got {end_factor}")
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
            raise ValueError(f"OneCycle only schedules the learning rate, got {param_name!r}")
        self.eta_max = eta_max
        self.div_factor = div_factor
        self.final_div_factor = final_div_factor
        if total_steps is not None:
            if not isinstance(total_steps, int) or total_steps <= 0:
                raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
            self.total_steps = total_steps
        else:
            self.total_steps = end - begin
        if not isinstance(pct_start, float) or not 0 <= pct_start <= 1:
            raise ValueError(f"pct_start must be a float between 0 and 1, got {pct_start!r}")
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
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
                raise ValueError(f"expected {len(groups)} values for eta_max, got {len(eta_max)}")
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
            raise ValueError(f"stepped {step + 1} times, but total_steps is {self.total_steps}")
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
        StepLR,
        MultiStepLR,
        ConstantLR,
        ExponentialLR,
        CosineAnnealingLR,
        LinearLR,
        PolyLR,
        OneCycleLR,
    )
}
