"""The schedules of one hyper-parameter, named as mmengine's ``*ParamScheduler`` classes:
step, multi-step, constant, exponential, cosine, linear, polynomial, 1cycle and cosine
with restarts. Each gives only ``_get_value``; the window and stepping are the base's.
"""

import math
from collections.abc import Sequence

from baton.optim.schedulers.base import INF, _ParamScheduler


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
        _check_one_cycle(param_name, total_steps, pct_start, anneal_strategy)
        self.eta_max = eta_max
        self.div_factor = div_factor
        self.final_div_factor = final_div_factor
        self.total_steps = total_steps if total_steps is not None else end - begin
        self.anneal_strategy = anneal_strategy
        self._schedule_phases = _one_cycle_phases(
            param_name, pct_start, self.total_steps, three_phase
        )
        groups = optimizer.param_groups
        max_values = _max_values(eta_max, len(groups), param_name)
        if last_step == -1:
            p = param_name
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


def _check_one_cycle(
    param_name: str, total_steps: int | None, pct_start: float, anneal_strategy: str
) -> None:
    """OneCycle's argument checks, in mmengine's order and words."""
    if param_name != "lr":
        # mmengine's words, its typo included, so that code matching them still does.
        raise AssertionError(
            "OneCycle only works for learning rate updating, but got patam_name as "
            f"{param_name}; use OneCycleLR, or another scheduler for {param_name!r}"
        )
    if total_steps is not None and (not isinstance(total_steps, int) or total_steps <= 0):
        raise ValueError(
            f"Expected positive integer total_steps, but got {total_steps}; "
            "leave it unset to use end - begin"
        )
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


def _one_cycle_phases(p: str, pct_start: float, total_steps: int, three_phase: bool) -> list:
    """mmengine's phase table: each phase's last step and the group keys it anneals
    between (``initial_lr`` -> ``max_lr`` -> ``min_lr``, or up, down and far down)."""
    if three_phase:
        phases = [
            (float(pct_start * total_steps) - 1, "initial", "max"),
            (float(2 * pct_start * total_steps) - 2, "max", "initial"),
            (total_steps - 1, "initial", "min"),
        ]
    else:
        phases = [
            (float(pct_start * total_steps) - 1, "initial", "max"),
            (total_steps - 1, "max", "min"),
        ]
    return [{"end_step": e, f"start_{p}": f"{s}_{p}", f"end_{p}": f"{t}_{p}"} for e, s, t in phases]


def _max_values(eta_max: float | list[float], group_count: int, p: str) -> list[float]:
    """One ``eta_max`` per param group."""
    if isinstance(eta_max, (list, tuple)):
        if len(eta_max) != group_count:
            raise ValueError(
                f"expected {group_count} values for max_{p}, got {len(eta_max)}: give "
                "eta_max one value per param group, or a single number for all"
            )
        return list(eta_max)
    return [eta_max] * group_count


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
