"""``AmpOptimWrapper``: ``OptimWrapper`` with automatic mixed precision (autocast and a
gradient scaler), mmengine's signature and state dict layout."""

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.optim import Optimizer

from baton.optim.wrapper import OptimWrapper


class AmpOptimWrapper(OptimWrapper):
    """``OptimWrapper`` with automatic mixed precision, with mmengine's signature.

    The forward pass runs under ``torch.autocast`` on the device of the model's
    parameters when :meth:`optim_context` is entered. ``float16`` uses a gradient scaler;
    ``bfloat16`` needs none (it keeps float32's exponent range), so the scaler is
    disabled; ``float32``/``float64`` turn autocast off. With ``dtype=None`` the device's
    autocast default is used (float16 on CUDA, bfloat16 on the CPU).

    Args:
        loss_scale: ``'dynamic'`` (default), a number for a static scale (kept after each
            step, as mmengine does), or a dict of ``GradScaler`` arguments.
        dtype: ``'float16'``, ``'bfloat16'``, ``'float32'``, ``'float64'``, one of those
            ``torch.dtype`` values, or ``None``.
        use_fsdp: Use torch's ``ShardedGradScaler`` (for FSDP models).
        **kwargs: ``optimizer``, ``accumulative_counts``, ``clip_grad`` (``OptimWrapper``'s).

    Raises:
        TypeError: ``loss_scale`` is not one of the above, or the optimizer came
            positionally (mmengine's first argument is ``loss_scale``).
        AssertionError: ``dtype`` is not one of the above.
    """

    valid_dtypes = ("float16", "bfloat16", "float32", "float64")

    def __init__(
        self,
        loss_scale: str | float | dict = "dynamic",
        dtype: str | torch.dtype | None = None,
        use_fsdp: bool = False,
        **kwargs,
    ):
        if isinstance(loss_scale, Optimizer) and "optimizer" not in kwargs:
            # What mmengine raises here, then why: its first parameter is loss_scale.
            raise TypeError(
                "OptimWrapper.__init__() missing 1 required positional argument: "
                "'optimizer'; AmpOptimWrapper's first parameter is loss_scale, as in "
                "mmengine: pass the optimizer by keyword, AmpOptimWrapper(optimizer=...)"
            )
        super().__init__(**kwargs)
        self._scale_update_param = None
        if isinstance(dtype, str):
            if dtype not in self.valid_dtypes:
                raise AssertionError(
                    f"dtype should be any of {self.valid_dtypes}, got {dtype}; bfloat16 "
                    "needs no loss scaling, float16 uses a GradScaler"
                )
            dtype = getattr(torch, dtype)
        if dtype is not None and dtype not in tuple(getattr(torch, d) for d in self.valid_dtypes):
            raise AssertionError(
                f"dtype should be None or instance of torch.dtype, got {dtype}; use one of "
                f"{self.valid_dtypes}"
            )
        self.cast_dtype = dtype
        # The scaler only matters for float16; its device is where float16 autocast runs.
        on_cuda = torch.cuda.is_available()
        use_scaler = dtype == torch.float16 or (dtype is None and on_cuda)
        device = "cuda" if on_cuda else "cpu"
        scaler_cls = torch.amp.GradScaler
        if use_fsdp:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            scaler_cls = ShardedGradScaler

        def scaler_type(**options) -> torch.amp.GradScaler:
            return scaler_cls(device, enabled=use_scaler, **options)

        if isinstance(loss_scale, str) and loss_scale == "dynamic":
            self.loss_scaler = scaler_type()
        elif isinstance(loss_scale, (int, float)) and not isinstance(loss_scale, bool):
            # Static: step() resets the scale to this value after every update.
            self._scale_update_param = float(loss_scale)
            self.loss_scaler = scaler_type(init_scale=float(loss_scale))
        elif isinstance(loss_scale, dict):
            self.loss_scaler = scaler_type(**loss_scale)
        else:
            raise TypeError(
                'loss_scale must be of type float, dict, or "dynamic", but got '
                f"{loss_scale}; a number is a static scale, a dict holds GradScaler arguments"
            )

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        """Backward on the scaled loss."""
        self.loss_scaler.scale(loss).backward(**kwargs)
        self._inner_count += 1

    def step(self, **kwargs) -> None:
        """Unscale, clip, step through the scaler and update its scale."""
        if self.clip_grad_kwargs:
            self.loss_scaler.unscale_(self.optimizer)
            self._clip_grad()
        self.loss_scaler.step(self.optimizer, **kwargs)
        self.loss_scaler.update(self._scale_update_param)

    @contextlib.contextmanager
    def optim_context(self, model: nn.Module) -> Iterator[None]:
        """Autocast on the model's device (where it is now), inside the base context.

        Raises:
            RuntimeError: bfloat16 on a CUDA device without bfloat16 support.
        """
        device_type = self._device_type(model)
        dtype = self.cast_dtype
        if dtype in (torch.float32, torch.float64):
            autocast = torch.autocast(device_type, enabled=False)
        else:
            if dtype is None:
                dtype = torch.get_autocast_dtype(device_type)
            if (
                device_type == "cuda"
                and dtype == torch.bfloat16
                and not torch.cuda.is_bf16_supported()
            ):
                raise RuntimeError(
                    "Current CUDA Device does not support bfloat16. Please switch dtype to float16."
                )
            autocast = torch.autocast(device_type, dtype=dtype)
        with super().optim_context(model), autocast:
            yield

    def _device_type(self, model: nn.Module) -> str:
        param = next(model.parameters(), None)
        if param is None:
            param = next((p for g in self.optimizer.param_groups for p in g["params"]), None)
        return param.device.type if param is not None else "cpu"

    def state_dict(self) -> dict:
        """Optimizer state plus ``'loss_scaler'`` (mmengine's layout)."""
        state = super().state_dict()
        state["loss_scaler"] = self.loss_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load optimizer and scaler state (the caller's dict is not modified).

        An empty scaler state (written by a disabled scaler, e.g. a bfloat16 run) is
        skipped, where torch's ``GradScaler.load_state_dict`` would raise.
        """
        state = dict(state_dict)
        scaler_state = state.pop("loss_scaler", None)
        if scaler_state:
            self.loss_scaler.load_state_dict(scaler_state)
        super().load_state_dict(state)
