"""``OptimWrapper``: mmengine's optimizer wrapper, with accumulation, clipping and
``update_params``; the mixed-precision subclass is in :mod:`baton.optim.amp`."""

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

# The package's name: baton's log channel for the wrappers (docs/mmengine.md), as
# before the wrappers were split into modules.
logger = logging.getLogger("baton.optim")

_CLIP_ARGS = {
    "norm": (torch.nn.utils.clip_grad_norm_, "grad_norm", {"max_norm"}, {"norm_type"}),
    "value": (torch.nn.utils.clip_grad_value_, "grad_value", {"clip_value"}, set()),
}
_CLIP_OPTIONAL = {"error_if_nonfinite", "foreach"}


class MessageHub:
    """The part of mmengine's ``MessageHub`` an optimizer wrapper writes to.

    It keeps the latest value of each scalar (``train/grad_norm`` after each clipped
    step). mmengine's own hub can take its place: ``wrapper.message_hub =
    mmengine.logging.MessageHub.get_current_instance()``.
    """

    def __init__(self) -> None:
        self.scalars: dict[str, float] = {}

    def update_scalar(self, key: str, value: float, count: int = 1) -> None:
        """Record the latest ``value`` of ``key`` (``count`` is accepted for mmengine's API)."""
        self.scalars[key] = float(value)

    def get_scalar(self, key: str) -> float:
        """The latest value of ``key``.

        Raises:
            KeyError: Nothing was recorded under ``key``.
        """
        return self.scalars[key]


class OptimWrapper:
    """Wraps an optimizer with gradient accumulation and clipping.

    Args:
        optimizer: A built ``torch.optim.Optimizer``.
        accumulative_counts: Update parameters every this many ``update_params`` calls.
        clip_grad: ``{'max_norm': ..., 'norm_type': ...}`` for norm clipping, or
            ``{'type': 'value', 'clip_value': ...}`` for value clipping.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        accumulative_counts: int = 1,
        clip_grad: dict | None = None,
    ):
        if not isinstance(optimizer, Optimizer):
            # mmengine fails later, with an AttributeError on ``param_groups``.
            raise TypeError(
                f"optimizer should be an Optimizer, but got {type(optimizer).__name__}; "
                "build one first, e.g. torch.optim.SGD(model.parameters(), lr=0.1)"
            )
        if (
            not isinstance(accumulative_counts, int)
            or isinstance(accumulative_counts, bool)
            or accumulative_counts < 1
        ):
            raise AssertionError(
                "_accumulative_counts at least greater than or equal to 1; got "
                f"{accumulative_counts!r}: give the number of iterations per update"
            )
        self._accumulative_counts = accumulative_counts
        self.optimizer = optimizer
        self.clip_grad_kwargs, self.clip_func, self.grad_name = self._parse_clip_grad(clip_grad)
        # The grad norm of each clipped step goes here (mmengine's runner logs it), and
        # to ``last_grad_norm``.
        self.message_hub = MessageHub()
        self.last_grad_norm: float | None = None
        self._inner_count = 0
        self._max_counts = -1
        self._remainder_counts = -1
        # This process's share of the current batch's loss when a batch is split unevenly
        # across processes (set by the training loop; see ResumableLoader.loss_share).
        self.batch_share = 1.0
        # With several param groups, mmengine adds a base group that no parameter uses:
        # schedulers step it too, so ``get_lr()['base_lr']`` follows the schedule of the
        # optimizer's default lr, whatever per-group multipliers the other groups have.
        if len(optimizer.param_groups) > 1:
            self.base_param_settings: dict | None = {
                "params": torch.tensor([0.0], dtype=torch.float),
                **optimizer.defaults,
            }
        else:
            self.base_param_settings = None

    @staticmethod
    def _parse_clip_grad(clip_grad: dict | None):
        if clip_grad is None:
            return None, None, None
        if not isinstance(clip_grad, dict) or not clip_grad:
            raise AssertionError(
                "If `clip_grad` is not None, it should be a `dict` which is the arguments of "
                "`torch.nn.utils.clip_grad_norm_` or clip_grad_value_`. Got "
                f"{clip_grad!r}; write {{'max_norm': 1.0}} or "
                "{'type': 'value', 'clip_value': 0.5}, or leave clip_grad unset"
            )
        kwargs = dict(clip_grad)  # mmengine pops 'type' from the caller's dict; we copy
        kind = kwargs.pop("type", "norm")
        if kind not in _CLIP_ARGS:
            raise ValueError(
                f'type of clip_grad should be "norm" or "value" but got {kind}; '
                "norm clips the gradients' total norm, value each element"
            )
        if not kwargs:
            raise AssertionError(
                "`clip_grad` should contain other arguments besides `type`. The arguments "
                "should match with the `torch.nn.utils.clip_grad_norm_` or clip_grad_value_`"
                f"; e.g. {{'type': {kind!r}, {sorted(_CLIP_ARGS[kind][2])[0]!r}: 1.0}}"
            )
        func, grad_name, required, optional = _CLIP_ARGS[kind]
        unknown = sorted(set(kwargs) - required - optional - _CLIP_OPTIONAL)
        missing = sorted(required - set(kwargs))
        # mmengine accepts these and fails at the first clipped step with the TypeError
        # of torch's clip function; baton refuses them up front, with the same type.
        if unknown:
            raise TypeError(
                f"{func.__name__}() got an unexpected keyword argument {unknown[0]!r}; "
                f"clip_grad of type {kind!r} takes "
                f"{sorted(required | optional | _CLIP_OPTIONAL)}"
            )
        if missing:
            raise TypeError(
                f"{func.__name__}() missing required argument {missing[0]!r}; add it to clip_grad"
            )
        return kwargs, func, grad_name

    # mmengine's public surface --------------------------------------------------------

    @property
    def param_groups(self) -> list[dict]:
        """The optimizer's parameter groups (schedulers write lr and momentum here), and
        the base group (``base_param_settings``) when there is one."""
        if self.base_param_settings is not None:
            return [*self.optimizer.param_groups, self.base_param_settings]
        return self.optimizer.param_groups

    @property
    def defaults(self) -> dict:
        """The optimizer's defaults."""
        return self.optimizer.defaults

    @property
    def inner_count(self) -> int:
        """How many times ``backward`` ran (the accumulation counter)."""
        return self._inner_count

    def update_params(
        self,
        loss: torch.Tensor,
        step_kwargs: dict | None = None,
        zero_kwargs: dict | None = None,
    ) -> None:
        """Scale the loss for accumulation, backpropagate, and step when a window is full."""
        loss = self.scale_loss(loss)
        self.backward(loss)
        if self.should_update():
            self.step(**(step_kwargs or {}))
            self.zero_grad(**(zero_kwargs or {}))

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        """``loss.backward()`` and count it."""
        loss.backward(**kwargs)
        self._inner_count += 1

    def step(self, **kwargs) -> None:
        """Clip gradients if configured, then ``optimizer.step()``."""
        if self.clip_grad_kwargs:
            self._clip_grad()
        self.optimizer.step(**kwargs)

    def zero_grad(self, **kwargs) -> None:
        """``optimizer.zero_grad()``."""
        self.optimizer.zero_grad(**kwargs)

    @contextlib.contextmanager
    def optim_context(self, model: nn.Module) -> Iterator[None]:
        """The context for a forward pass (skips gradient sync while accumulating)."""
        if not self.should_sync() and hasattr(model, "no_sync"):
            with model.no_sync():
                yield
        else:
            yield

    def get_lr(self) -> dict[str, list[float]]:
        """``{'lr': [lr of each param group]}``, with ``'base_lr'`` first when there is a
        base group."""
        lrs = {}
        if self.base_param_settings is not None:
            lrs["base_lr"] = [self.base_param_settings["lr"]]
        lrs["lr"] = [group["lr"] for group in self.optimizer.param_groups]
        return lrs

    def get_momentum(self) -> dict[str, list[float]]:
        """``{'momentum': [...]}``, reading Adam's ``betas[0]`` where there is no momentum."""
        values = []
        for group in self.optimizer.param_groups:
            if "momentum" in group:
                values.append(group["momentum"])
            elif "betas" in group:
                values.append(group["betas"][0])
            else:
                values.append(0.0)
        return {"momentum": values}

    def state_dict(self) -> dict:
        """The optimizer's state dict, plus ``base_param_settings`` when there is a base
        group (mmengine's layout)."""
        state = self.optimizer.state_dict()
        if self.base_param_settings is not None:
            state["base_param_settings"] = self.base_param_settings
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict written by this wrapper or by mmengine's (not modified)."""
        state = dict(state_dict)
        base = state.pop("base_param_settings", None)
        if base is not None:
            self.base_param_settings = base
        self.optimizer.load_state_dict(state)

    # accumulation ---------------------------------------------------------------------

    def initialize_count_status(
        self,
        model: nn.Module,
        init_counts: int,
        max_counts: int,
        *,
        grads_restored: bool = False,
    ) -> None:
        """Set the accumulation counter (on prepare and resume) and the run's length.

        ``grads_restored`` says that the gradients accumulated so far in the current
        window were restored too, so resuming inside a window loses nothing.
        """
        self._inner_count = init_counts
        self._max_counts = max_counts
        if init_counts % self._accumulative_counts != 0 and not grads_restored:
            logger.warning(
                "Resumed iteration number is not divisible by `_accumulative_counts` in "
                "`GradientCumulativeOptimizerHook`, which means the gradient of some "
                "iterations is lost and the result may be influenced slightly. (Resumed at "
                "iteration %d, inside a window of %d; baton's checkpoints keep those "
                "gradients, this one did not.)",
                init_counts,
                self._accumulative_counts,
            )
        if self._accumulative_counts > 1 and any(
            isinstance(module, _BatchNorm) for module in model.modules()
        ):
            logger.warning(
                "Gradient accumulative may slightly decrease performance because the model "
                "has BatchNorm layers. (Their statistics see each micro-batch of %d, not the "
                "accumulated batch.)",
                self._accumulative_counts,
            )
        self._remainder_counts = max_counts % self._accumulative_counts

    def in_window(self) -> bool:
        """True between two updates, while gradients are being accumulated."""
        return self._accumulative_counts > 1 and self._inner_count % self._accumulative_counts != 0

    def should_update(self) -> bool:
        """True when this backward completes an accumulation window (or the run)."""
        return (
            self._inner_count % self._accumulative_counts == 0
            or self._inner_count == self._max_counts
        )

    def should_sync(self) -> bool:
        """True when the next backward completes a window."""
        return (self._inner_count + 1) % self._accumulative_counts == 0 or (
            self._inner_count + 1 == self._max_counts
        )

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Divide the loss by the window size (the last, shorter window by its own size),
        and weigh it by :attr:`batch_share` (this process's share of a batch split
        unevenly across processes)."""
        if self.batch_share != 1.0:
            loss = loss * self.batch_share
        if self._accumulative_counts == 1:
            return loss
        full_windows_end = self._max_counts - self._remainder_counts
        if self._max_counts == -1 or self._inner_count < full_windows_end:
            factor = self._accumulative_counts
        else:
            factor = self._remainder_counts
        if factor <= 0:
            raise AssertionError(
                "loss_factor should be larger than zero! This error could happened when "
                "initialize_iter_status called with an error `init_counts` or `max_counts` "
                f"(backward {self._inner_count + 1} of {self._max_counts}): give "
                "initialize_count_status the run's total iterations"
            )
        return loss / factor

    def _clip_grad(self) -> None:
        params = [
            p
            for group in self.param_groups
            for p in group["params"]
            if p.requires_grad and p.grad is not None
        ]
        if params:
            result = self.clip_func(params, **self.clip_grad_kwargs)
            if result is not None:  # clip_grad_value_ returns None
                self.last_grad_norm = float(result)
                self.message_hub.update_scalar(f"train/{self.grad_name}", self.last_grad_norm)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(accumulative_counts={self._accumulative_counts}, "
            f"clip_grad={self.clip_grad_kwargs}, optimizer={self.optimizer!r})"
        )
