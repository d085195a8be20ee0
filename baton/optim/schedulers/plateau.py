"""The plateau scheduler: it follows validations instead of optimizer updates, so it
neither steps when built nor wraps ``optimizer.step``, and has its own ``step(metrics)``.
"""

from collections.abc import Sequence

from baton.optim.schedulers.base import (
    INF,
    _check_optimizer,
    _check_range,
    _ParamScheduler,
    _record_initial_values,
    logger,
)


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
        self.min_values = _min_values(optimizer, min_value)
        self.patience = patience
        self.cooldown = cooldown
        self.cooldown_counter = 0
        self.num_bad_epochs = 0
        self.eps = eps
        self.monitor = monitor
        _check_rules(threshold, rule, threshold_rule)
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


def _min_values(optimizer, min_value: float | Sequence[float]) -> list[float]:
    """One minimum per param group of ``optimizer``."""
    # The wrapper's extra base group (two or more param groups) gets the last group's
    # minimum, as in mmengine.
    raw_groups = getattr(optimizer, "optimizer", optimizer).param_groups
    if not isinstance(min_value, (list, tuple)):
        return [min_value] * len(optimizer.param_groups)
    if len(min_value) != len(raw_groups):
        raise ValueError(
            f"expected {len(raw_groups)} min_lrs, got {len(min_value)}: give "
            "min_value one value per param group, or a single number for all"
        )
    min_values = list(min_value)
    if getattr(optimizer, "base_param_settings", None) is not None:
        min_values.append(min_values[-1])
    return min_values


def _check_rules(threshold: float, rule: str, threshold_rule: str) -> None:
    """How a metric is judged better, checked in mmengine's order and words."""
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
