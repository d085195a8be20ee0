"""Turning ``type:`` names into classes, safely.

A component is a dict with a ``type`` key, as in mmengine configs. ``type`` is either a
short name (torch optimizers, losses and layers, baton's schedulers and wrappers) or a
dotted path. Dotted paths may only point into allowed module prefixes: torch, baton,
the project's own packages, and prefixes the user adds (``BATON_ALLOWED_MODULES``, a
comma-separated list, or the config's ``allowed_modules``). Configs also arrive from the
Prefect UI, so ``type: os.system`` must never resolve.
"""

import functools
import importlib
import inspect
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from baton import data, models, optim, schedulers

DEFAULT_ALLOWED_PREFIXES = ("torch", "baton", "tasks", "flows")


def allowed_prefixes(extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The module prefixes a dotted ``type`` may point into."""
    from_env = [p.strip() for p in os.environ.get("BATON_ALLOWED_MODULES", "").split(",")]
    return (*DEFAULT_ALLOWED_PREFIXES, *(p for p in from_env if p), *extra)


@functools.cache
def _short_names() -> dict[str, Any]:
    names: dict[str, Any] = {}
    for name, obj in vars(torch.optim).items():
        if inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer):
            names[name] = obj
    for name, obj in vars(torch.nn).items():
        if inspect.isclass(obj) and issubclass(obj, torch.nn.Module):
            names[name] = obj
    names.update(schedulers.SCHEDULERS)
    names["OptimWrapper"] = optim.OptimWrapper
    names["AmpOptimWrapper"] = optim.AmpOptimWrapper
    names.update(models.MODELS)
    names.update(data.DATASETS)
    # kornia takes ~0.2 s to import: paid when names are first resolved, not by `import baton`
    from baton import transforms

    names.update(transforms.TRANSFORMS)
    return names


def _is_allowed(path: str, prefixes: Iterable[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def resolve_type(name: Any, *, extra_prefixes: Iterable[str] = ()) -> Any:
    """The class or function a ``type`` names.

    Raises:
        ValueError: Unknown short name, a path outside the allowed prefixes, or a path
            that cannot be imported.
    """
    if not isinstance(name, str):
        if callable(name):
            return name
        raise ValueError(f"'type' must be a string naming a class, got {type(name).__name__}")
    short = _short_names()
    if name in short:
        return short[name]
    if "." not in name:
        raise ValueError(
            f"unknown type {name!r}: not a short name (torch optimizer, torch.nn module, "
            "baton scheduler, model or dataset) and not a dotted path like 'torch.nn.Linear'"
        )
    prefixes = allowed_prefixes(extra_prefixes)
    if not _is_allowed(name, prefixes):
        raise ValueError(
            f"type {name!r} is outside the allowed modules ({', '.join(prefixes)}); add its "
            "package to 'allowed_modules' in the config or to BATON_ALLOWED_MODULES if you "
            "trust it"
        )
    module_name, _, attr = name.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"type {name!r}: cannot import module {module_name!r} ({err})") from err
    try:
        return getattr(module, attr)
    except AttributeError as err:
        raise ValueError(f"type {name!r}: module {module_name!r} has no {attr!r}") from err


def _is_component_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(item, Mapping) and "type" in item for item in value)
    )


def build(cfg: Mapping, *, extra_prefixes: Iterable[str] = (), **defaults: Any) -> Any:
    """Build a component dict; nested dicts with a ``type`` (and lists of them) are built first.

    The dict is not modified. ``defaults`` fill arguments the dict does not set.
    """
    args = dict(cfg)
    factory = resolve_type(args.pop("type", None), extra_prefixes=extra_prefixes)
    for key, value in args.items():
        if isinstance(value, Mapping) and "type" in value:
            args[key] = build(value, extra_prefixes=extra_prefixes)
        elif _is_component_list(value):
            args[key] = [build(item, extra_prefixes=extra_prefixes) for item in value]
    for key, value in defaults.items():
        args.setdefault(key, value)
    return factory(**args)
