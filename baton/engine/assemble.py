"""How the strategy's components are assembled from objects or config dicts: the model,
the optimizer wrapper, the parameter schedulers, and ``auto_scale_lr``'s scaling.

:meth:`SingleDeviceStrategy.prepare <baton.engine.strategy.SingleDeviceStrategy.prepare>` calls
these; config dicts become objects through the one registry, :mod:`baton.build`.
"""

import logging

import torch
from torch import nn

from baton import build
from baton.optim.amp import AmpOptimWrapper
from baton.optim.schedulers import _ParamScheduler
from baton.optim.wrapper import OptimWrapper

_AUTO_SCALE_KEYS = ("enable", "base_batch_size")
_WRAPPER_TYPES = {"OptimWrapper": OptimWrapper, "AmpOptimWrapper": AmpOptimWrapper}
_WRAPPER_KEYS = ("type", "optimizer", "accumulative_counts", "clip_grad", "loss_scale", "dtype")


def model(spec: nn.Module | dict) -> nn.Module:
    """A module as given, or built from a component dict."""
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, dict):
        return build.build(spec, "model")
    raise TypeError(f"model must be an nn.Module or a dict, got {type(spec).__name__}")


def optim_wrapper(cfg, module: nn.Module) -> OptimWrapper:
    """A wrapper as given, around an optimizer, or built from a dict (``type``,
    ``optimizer`` and the wrapper's own arguments)."""
    if isinstance(cfg, OptimWrapper):
        return cfg
    if isinstance(cfg, torch.optim.Optimizer):
        return OptimWrapper(cfg)
    if not isinstance(cfg, dict):
        raise TypeError(
            f"optim_wrapper must be an OptimWrapper, an Optimizer or a dict, got "
            f"{type(cfg).__name__}"
        )
    args = dict(cfg)
    unknown = sorted(set(args) - set(_WRAPPER_KEYS))
    if unknown:
        raise ValueError(
            f"optim_wrapper got unsupported key(s) {unknown}; supported: {', '.join(_WRAPPER_KEYS)}"
        )
    kind = args.pop("type", "OptimWrapper")
    wrapper_cls = _WRAPPER_TYPES.get(kind, kind) if isinstance(kind, str) else kind
    if not (isinstance(wrapper_cls, type) and issubclass(wrapper_cls, OptimWrapper)):
        raise ValueError(
            f"optim_wrapper type {kind!r} is unknown; use {' or '.join(_WRAPPER_TYPES)}"
        )
    if "optimizer" not in args:
        raise ValueError("optim_wrapper needs an 'optimizer', e.g. {'type': 'SGD', 'lr': 0.1}")
    optimizer = args.pop("optimizer")
    if isinstance(optimizer, dict):
        optimizer = build.build(optimizer, "optimizer", params=module.parameters())
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer built a {type(optimizer).__name__}, not an Optimizer")
    # By keyword: AmpOptimWrapper's first parameter is loss_scale, as in mmengine.
    return wrapper_cls(optimizer=optimizer, **args)


def param_schedulers(cfg, wrapper: OptimWrapper, dispatch_kwargs: dict) -> list[_ParamScheduler]:
    """Schedulers as given, or built from dicts against ``wrapper`` and the run's
    horizon (``dispatch_kwargs``)."""
    items = cfg if isinstance(cfg, (list, tuple)) else [cfg]
    built = []
    for item in items:
        if isinstance(item, _ParamScheduler):
            built.append(item)
        elif isinstance(item, dict):
            built.append(
                build.build_scheduler(
                    item,
                    wrapper,
                    epoch_length=dispatch_kwargs.get("epoch_length"),
                    max_epochs=dispatch_kwargs.get("max_epochs"),
                    max_iters=dispatch_kwargs.get("max_iters"),
                )
            )
        else:
            raise TypeError(
                f"param_scheduler items must be schedulers or dicts, got {type(item).__name__}"
            )
    return built


def built_schedulers(cfg) -> list[_ParamScheduler]:
    """The scheduler objects among ``param_scheduler`` (built before ``prepare``)."""
    items = cfg if isinstance(cfg, (list, tuple)) else [cfg]
    return [item for item in items if isinstance(item, _ParamScheduler)]


def check_auto_scale_lr(cfg: dict | None) -> dict | None:
    """``auto_scale_lr`` checked: a dict of ``enable`` and ``base_batch_size``."""
    if cfg is None:
        return None
    if not isinstance(cfg, dict):
        raise ValueError(f"auto_scale_lr must be a dict, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(_AUTO_SCALE_KEYS))
    if unknown:
        raise ValueError(
            f"auto_scale_lr got unknown key(s) {unknown}; use enable and base_batch_size"
        )
    if cfg.get("enable", False):
        base = cfg.get("base_batch_size")
        if not isinstance(base, int) or base <= 0:
            raise ValueError(
                "auto_scale_lr is enabled but 'base_batch_size' is missing or not a "
                f"positive int (got {base!r})"
            )
    return dict(cfg)


def scale_lr(
    cfg: dict | None,
    wrapper: OptimWrapper,
    built: list[_ParamScheduler],
    batch_size: int | None,
    logger: logging.Logger,
) -> None:
    """Scale every learning rate by ``batch_size / base_batch_size`` (when enabled).

    Schedulers built before this call recorded the unscaled values; their base and last
    values are scaled too (mmengine refuses this case with a RuntimeError).
    """
    if not cfg or not cfg.get("enable", False):
        return
    if batch_size is None:
        raise ValueError(
            "auto_scale_lr is enabled, so dispatch_kwargs must give "
            "'train_micro_batch_size_per_gpu' (the training batch size)"
        )
    ratio = float(batch_size) / float(cfg["base_batch_size"])
    logger.info(
        "auto_scale_lr: batch size %d against base %d, learning rates x %.4g",
        batch_size,
        cfg["base_batch_size"],
        ratio,
    )
    for group in wrapper.param_groups:
        group["lr"] *= ratio
        if "initial_lr" in group:
            group["initial_lr"] *= ratio
    for scheduler in built:
        if scheduler.param_name == "lr":
            if hasattr(scheduler, "base_values"):  # ReduceOnPlateau keeps none
                scheduler.base_values = [v * ratio for v in scheduler.base_values]
            scheduler._last_value = [v * ratio for v in scheduler._last_value]
