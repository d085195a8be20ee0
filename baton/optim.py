"""Optimizer wrappers with mmengine's interface: accumulation, clipping, ``update_params``.

``OptimWrapper`` is a drop-in for ``mmengine.optim.OptimWrapper``; its ``state_dict`` is
the optimizer's own, so checkpoints move freely between the two. ``AmpOptimWrapper``
adds autocast and a gradient scaler, and stores the scaler under ``'loss_scaler'`` as
mmengine does.
"""

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn
from torch.optim import Optimizer

logger = logging.getLogger(__name__)


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
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if not isinstance(accumulative_counts, int) or accumulative_counts < 1:
            raise ValueError(
                f"accumulative_counts must be an int >= 1, got {accumulative_counts!r}"
            )
        self.optimizer = optimizer
        self._accumulative_counts = accumulative_counts
        self.clip_grad_kwargs, self._clip_func = self._parse_clip_grad(clip_grad)
        self.last_grad_norm: float | None = None
        self._inner_count = 0
        self._max_counts = -1
        self._remainder_counts = -1

    @staticmethod
    def _parse_clip_grad(clip_grad: dict | None):
        if clip_grad is None:
            return None, None
        if not isinstance(clip_grad, dict) or not clip_grad:
            raise ValueError(
                "clip_grad must be a non-empty dict such as {'max_norm': 1.0} or "
                f"{{'type': 'value', 'clip_value': 0.5}}, got {clip_grad!r}"
            )
        kwargs = dict(clip_grad)
        kind = kwargs.pop("type", "norm")
        if kind == "norm":
            func, allowed = torch.nn.utils.clip_grad_norm_, {"max_norm", "norm_type"}
        elif kind == "value":
            func, allowed = torch.nn.utils.clip_grad_value_, {"clip_value"}
        else:
            raise ValueError(f"clip_grad type must be 'norm' or 'value', got {kind!r}")
        unknown = set(kwargs) - allowed - {"error_if_nonfinite", "foreach"}
        missing = allowed - {"norm_type"} - set(kwargs)
        if unknown or missing:
            raise ValueError(
                f"clip_grad of type {kind!r} takes {sorted(allowed)}; "
                f"unknown: {sorted(unknown)}, missing: {sorted(missing)}"
            )
        return kwargs, func

    # mmengine's public surface --------------------------------------------------------

    @property
    def param_groups(self) -> list[dict]:
        """The optimizer's parameter groups (schedulers write lr and momentum here)."""
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
        if self._clip_func is not None:
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
        """``{'lr': [lr of each param group]}``."""
        return {"lr": [group["lr"] for group in self.param_groups]}

    def get_momentum(self) -> dict[str, list[float]]:
        """``{'momentum': [...]}``, reading Adam's ``betas[0]`` where there is no momentum."""
        values = []
        for group in self.param_groups:
            if "momentum" in group:
                values.append(group["momentum"])
            elif "betas" in group:
                values.append(group["betas"][0])
            else:
                values.append(0.0)
        return {"momentum": values}

    def state_dict(self) -> dict:
        """The optimizer's state dict (mmengine's layout)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load an optimizer state dict written by this wrapper or by mmengine's."""
        self.optimizer.load_state_dict(state_dict)

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
                "resumed at iteration %d, inside an accumulation window of %d: the "
                "gradients of that window's earlier iterations were not saved",
                init_counts,
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
        """Divide the loss by the window size (the last, shorter window by its own size)."""
        if self._accumulative_counts == 1:
            return loss
        full_windows_end = self._max_counts - self._remainder_counts
        if self._max_counts == -1 or self._inner_count < full_windows_end:
            factor = self._accumulative_counts
        else:
            factor = self._remainder_counts
        return loss / factor

    def _clip_grad(self) -> None:
        params = [
            p
            for group in self.param_groups
            for p in group["params"]
            if p.requires_grad and p.grad is not None
        ]
        if params:
            result = self._clip_func(params, **self.clip_grad_kwargs)
            if result is not None:
                self.last_grad_norm = float(result)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(accumulative_counts={self._accumulative_counts}, "
            f"clip_grad={self.clip_grad_kwargs}, optimizer={self.optimizer!r})"
        )


class AmpOptimWrapper(OptimWrapper):
    """``OptimWrapper`` with automatic mixed precision.

    On CUDA, autocast to ``dtype`` (float16 by default) with a gradient scaler; on CPU,
    autocast to bfloat16 without a scaler (bfloat16 keeps float32's exponent range).

    Args:
        loss_scale: ``'dynamic'`` (default), a float for a static scale, or a dict of
            ``torch.amp.GradScaler`` arguments.
        dtype: ``'float16'``, ``'bfloat16'`` or a ``torch.dtype``; ``None`` chooses.
        device_type: ``'cuda'`` or ``'cpu'``; ``None`` follows the optimizer's params.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        accumulative_counts: int = 1,
        clip_grad: dict | None = None,
        loss_scale: str | float | dict = "dynamic",
        dtype: str | torch.dtype | None = None,
        device_type: str | None = None,
    ):
        super().__init__(optimizer, accumulative_counts, clip_grad)
        if device_type is None:
            first = next((p for g in optimizer.param_groups for p in g["params"]), None)
            device_type = first.device.type if first is not None else "cpu"
        self.device_type = device_type
        if isinstance(dtype, str):
            if dtype not in ("float16", "bfloat16"):
                raise ValueError(f"AMP dtype must be 'float16' or 'bfloat16', got {dtype!r}")
            dtype = getattr(torch, dtype)
        self.cast_dtype = dtype or (torch.float16 if device_type == "cuda" else torch.bfloat16)
        use_scaler = self.cast_dtype == torch.float16
        if isinstance(loss_scale, dict):
            scaler_kwargs = dict(loss_scale)
        elif loss_scale == "dynamic":
            scaler_kwargs = {}
        elif isinstance(loss_scale, (int, float)):
            scaler_kwargs = {"init_scale": float(loss_scale), "growth_interval": 2**31 - 1}
        else:
            raise ValueError(
                f"loss_scale must be 'dynamic', a number or a dict, got {loss_scale!r}"
            )
        self.loss_scaler = torch.amp.GradScaler(device_type, enabled=use_scaler, **scaler_kwargs)

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        """Backward on the scaled loss."""
        self.loss_scaler.scale(loss).backward(**kwargs)
        self._inner_count += 1

    def step(self, **kwargs) -> None:
        """Unscale, clip, step through the scaler and update its scale."""
        if self._clip_func is not None:
            self.loss_scaler.unscale_(self.optimizer)
            self._clip_grad()
        self.loss_scaler.step(self.optimizer, **kwargs)
        self.loss_scaler.update()

    @contextlib.contextmanager
    def optim_context(self, model: nn.Module) -> Iterator[None]:
        """Autocast for the forward pass, inside the base context."""
        with super().optim_context(model), torch.autocast(self.device_type, self.cast_dtype):
            yield

    def state_dict(self) -> dict:
        """Optimizer state plus ``'loss_scaler'`` (mmengine's layout)."""
        state = dict(self.optimizer.state_dict())
        state["loss_scaler"] = self.loss_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load optimizer and scaler state."""
        state = dict(state_dict)
        scaler_state = state.pop("loss_scaler", None)
        if scaler_state:
            self.loss_scaler.load_state_dict(scaler_state)
        self.optimizer.load_state_dict(state)
