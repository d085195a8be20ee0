"""The base of every parameter scheduler: the ``[begin, end)`` window, the chainable
step, mmengine's state dict, and the optimizer-step counter behind its ordering warning.

The checks here are shared by the schedulers that do not step when built
(:mod:`baton.optim.schedulers.plateau`), so each message is written once.
"""

import logging
import warnings
import weakref
from collections.abc import Callable
from functools import wraps

from torch.optim import Optimizer

from baton.optim.wrapper import OptimWrapper

# One channel for the package, the one it has logged on since it was a top-level module.
logger = logging.getLogger("baton.schedulers")

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
        self._take_step()

    def _take_step(self) -> None:
        """Write the value of the current global step, if it falls in ``[begin, end)``.

        A resume that raises the horizon takes again the step that the old ``end`` skipped
        (:mod:`baton.run.resume_policy.horizon`), without counting it a second time.
        """
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
