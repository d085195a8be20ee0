"""The one place where config becomes objects: ``type:`` names, kinds and arguments.

A component is a mapping with a ``type`` key, as in mmengine configs. Each place a
config may hold one is a *slot* with a *kind*, and a kind accepts only what it is:

========== ==================================================================
model      an ``nn.Module`` subclass
loss       an ``nn.Module`` subclass
dataset    a map-style ``torch.utils.data.Dataset`` subclass
optimizer  a ``torch.optim.Optimizer`` subclass
scheduler  one of baton's parameter schedulers
transform  an ``nn.Module`` subclass (kornia, torchvision v2, your own)
loader     only functions that trusted code registered (``@register("loader")``)
========== ==================================================================

A ``type`` is a short name of its kind (``SGD``, ``MLP``, ``StepLR``) or a dotted path
into an allowed module (torch and baton, plus what the operator allows: see
:mod:`baton.trust`). A plain function is never a component unless trusted code
registered it for that kind with :func:`register`. Arguments are checked against the
target's signature and annotations (pydantic) before anything is built, and a component
nested inside another's arguments is accepted only where the argument is declared a
slot (``Annotated[..., Slot(kind)]``, see :mod:`baton.kinds`). Validation
(:func:`check`) and building (:func:`build`) walk the same table, so "valid" means
"will build". A target's parameters, and the check of an argument that is not a slot,
are read in :mod:`baton.build.args`.
"""

import difflib
import functools
import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, IterableDataset

from baton import models

# EXTERNAL_SLOTS and Problem stay part of this module's API; they live with the argument checks.
from baton.build.args import EXTERNAL_SLOTS as EXTERNAL_SLOTS
from baton.build.args import Problem, check_plain_argument, signature, unknown_argument
from baton.data import datasets
from baton.errors import ConfigError
from baton.kinds import Slot, TransformBase
from baton.optim import schedulers
from baton.trust.allowances import Trust, where_to_set


@dataclass(frozen=True)
class Kind:
    """What a slot accepts."""

    name: str
    bases: tuple[type, ...]
    what: str
    short_names: Callable[[], dict[str, Any]]
    excluded: tuple[type, ...] = ()

    def accepts(self, obj: Any) -> bool:
        """True if ``obj`` may be built in a slot of this kind."""
        if _registered_as(obj, self.name):
            return True
        return (
            inspect.isclass(obj)
            and issubclass(obj, self.bases)
            and not issubclass(obj, self.excluded)
            and not inspect.isabstract(obj)
        )


# name -> object registered by trusted code, per kind
_REGISTERED: dict[str, dict[str, Any]] = {}


def register(kind: str, name: str | None = None) -> Callable:
    """Make a function (or class) a component of ``kind`` under ``name``.

    Only trusted code calls this (baton itself, or a module the operator allows), so a
    config can name a registered function but never an arbitrary one::

        @register("loader")
        def gray_png(path: str) -> PIL.Image.Image: ...
    """
    if kind not in KINDS:
        raise ValueError(f"unknown component kind {kind!r}; kinds: {', '.join(KINDS)}")

    def decorate(obj: Any) -> Any:
        _REGISTERED.setdefault(kind, {})[name or obj.__name__] = obj
        return obj

    return decorate


def _registered_as(obj: Any, kind: str) -> bool:
    return any(obj is item for item in _REGISTERED.get(kind, {}).values())


def _classes_in(module: Any, base: type) -> dict[str, type]:
    return {
        name: obj
        for name, obj in vars(module).items()
        if inspect.isclass(obj) and issubclass(obj, base) and not name.startswith("_")
    }


@functools.cache
def _torch_modules() -> dict[str, type]:
    return _classes_in(torch.nn, nn.Module)


def _module_names() -> dict[str, Any]:
    """Short names of models and losses: torch.nn's modules and baton's models."""
    return {**_torch_modules(), **models.MODELS}


def _dataset_names() -> dict[str, Any]:
    return dict(datasets.DATASETS)


def _optimizer_names() -> dict[str, Any]:
    return _classes_in(torch.optim, torch.optim.Optimizer)


def _scheduler_names() -> dict[str, Any]:
    return dict(schedulers.SCHEDULERS)


def _transform_names() -> dict[str, Any]:
    # kornia takes ~0.2 s to import: paid when a transform is first named, not by
    # `import baton` (every flow-run process imports the engine).
    return dict(importlib.import_module("baton.data.transforms").TRANSFORMS)


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("model", (nn.Module,), "an nn.Module subclass", _module_names),
        Kind("loss", (nn.Module,), "an nn.Module subclass", _module_names),
        Kind(
            "dataset",
            (Dataset,),
            "a map-style Dataset subclass",
            _dataset_names,
            excluded=(IterableDataset,),
        ),
        Kind("optimizer", (torch.optim.Optimizer,), "an Optimizer subclass", _optimizer_names),
        Kind(
            "scheduler",
            (schedulers._ParamScheduler,),
            "one of baton's parameter schedulers",
            _scheduler_names,
        ),
        Kind(
            "transform",
            (nn.Module, TransformBase),
            "an nn.Module subclass or one of baton's transforms",
            _transform_names,
        ),
        Kind("loader", (), "a function registered as a loader", dict),
        Kind(
            "model_wrapper",
            (DistributedDataParallel,),
            "a DistributedDataParallel subclass",
            lambda: {"DistributedDataParallel": DistributedDataParallel},
        ),
    )
}

# Arguments the builder passes itself, per kind; a config may not set them.
SUPPLIED = {"optimizer": frozenset({"params"}), "scheduler": frozenset({"optimizer"})}

# Scheduler arguments that are not constructor arguments (handled by the builder).
_SCHEDULER_EXTRAS = {"convert_to_iter_based"}


# --- resolving a type ----------------------------------------------------------------


def resolve(type_name: Any, kind: str, trust: Trust | None = None) -> Any:
    """The class (or registered function) a ``type`` names in a slot of ``kind``.

    Raises:
        ConfigError: Not a string, an unknown short name, a module the operator does
            not allow, or something that is not of the slot's kind.
    """
    spec = KINDS[kind]
    trust = trust or Trust.from_environment()
    if not isinstance(type_name, str) or not type_name:
        raise ConfigError(f"'type' must be a non-empty string naming {spec.what}")
    short = {**spec.short_names(), **_REGISTERED.get(kind, {})}
    if type_name in short:
        obj = short[type_name]
    elif "." not in type_name:
        hint = difflib.get_close_matches(type_name, list(short), n=1)
        choices = (
            f"choose one of {', '.join(sorted(short))}"
            if len(short) <= 40
            else f"give a short name of {spec.what} or a dotted path such as "
            "'mypkg.models.Net' in a module the operator allows"
        )
        raise ConfigError(
            f"unknown {kind} type {type_name!r}"
            + (f"; did you mean {hint[0]!r}?" if hint else "")
            + f"; {choices}"
        )
    else:
        obj = _import(type_name, trust)
    if not spec.accepts(obj):
        found = "a function" if inspect.isroutine(obj) else _describe(obj)
        raise ConfigError(
            f"{type_name!r} is {found}, not {spec.what}; a {kind} slot takes only {spec.what}"
            + (
                " (functions only when trusted code registered them with baton.build.register)"
                if inspect.isroutine(obj)
                else ""
            )
        )
    if type_name not in short:
        _check_defined_in(type_name, obj, trust)
    return obj


def _import(dotted: str, trust: Trust) -> Any:
    parts = dotted.split(".")
    if not all(p.isidentifier() and not p.startswith("_") for p in parts):
        raise ConfigError(f"type {dotted!r} is not a dotted path of public names (no '_' prefixes)")
    if not trust.allows_module(dotted):
        raise ConfigError(
            f"type {dotted!r} is outside the allowed modules "
            f"({', '.join(trust.module_prefixes())}); {where_to_set('allowed_modules')}"
        )
    module_name, _, attr = dotted.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"type {dotted!r}: cannot import module {module_name!r} ({err})") from err
    try:
        return getattr(module, attr)
    except AttributeError as err:
        raise ConfigError(f"type {dotted!r}: module {module_name!r} has no {attr!r}") from err


def _check_defined_in(dotted: str, obj: Any, trust: Trust) -> None:
    """An allowed module may re-export what a denied one defines (``torch.utils.data``
    exports ``MapDataPipe`` of ``torch.utils.data.datapipes``): the module that defines
    the object must be allowed too, so nothing defined in a denied module is reachable by
    another name. No exception for torch or baton: what they define lives under their
    own names, which are allowed unless denied."""
    defined_in = getattr(obj, "__module__", None)
    if isinstance(defined_in, str) and not trust.allows_module(defined_in):
        raise ConfigError(
            f"type {dotted!r} is defined in {defined_in}, outside the allowed modules "
            f"({', '.join(trust.module_prefixes())}) or inside a denied one; name a "
            f"component defined in an allowed module, or {where_to_set('allowed_modules')}"
        )


def _describe(obj: Any) -> str:
    if inspect.isclass(obj):
        return f"the class {obj.__module__}.{obj.__qualname__}"
    if inspect.ismodule(obj):
        return "a module"
    return f"a {type(obj).__name__}"


# --- checking and building -----------------------------------------------------------


def check(
    cfg: Any,
    kind: str,
    *,
    trust: Trust | None = None,
    supplied: Iterable[str] = (),
    path: tuple = (),
) -> list[Problem]:
    """Every problem with a component, without building anything.

    Returns:
        ``(key path, message)`` pairs; the path starts with ``path``.
    """
    trust = trust or Trust.from_environment()
    if not isinstance(cfg, Mapping):
        return [(path, f"a {kind} is a mapping with a 'type' key, found {type(cfg).__name__}")]
    try:
        factory = resolve(cfg.get("type"), kind, trust)
    except ConfigError as err:
        return [((*path, "type"), str(err))]
    supplied = set(supplied) | SUPPLIED.get(kind, frozenset())
    if kind == "scheduler" and not factory.__name__.endswith("ParamScheduler"):
        # StepLR, StepMomentum...: the class fixes the parameter it schedules.
        supplied.add("param_name")
    params, takes_any = signature(factory)
    extras = _SCHEDULER_EXTRAS if kind == "scheduler" else set()
    args = {k: v for k, v in cfg.items() if k != "type"}
    problems: list[Problem] = []
    for name, value in args.items():
        key = (*path, name)
        param = params.get(name)
        if name in supplied:
            problems.append((key, f"{cfg['type']}'s {name!r} is supplied by baton; remove it"))
        elif param is None and name not in extras:
            accepted = [p for p in params if p not in supplied]
            problems += unknown_argument(cfg["type"], name, value, accepted, takes_any, key)
        elif param is not None and param.slot is not None:
            problems += _check_slot(value, param.slot, trust, key)
        else:
            problems += check_plain_argument(cfg["type"], name, value, param, trust, key)
    for name, param in params.items():
        if param.required and name not in args and name not in supplied:
            problems.append(((*path, name), f"{cfg['type']} needs argument {name!r}"))
    if kind == "scheduler" and cfg.get("convert_to_iter_based") and cfg.get("by_epoch") is False:
        problems.append(
            (
                (*path, "convert_to_iter_based"),
                "only an epoch-based scheduler (by_epoch: true) can be converted",
            )
        )
    return problems


def _check_slot(value: Any, slot: Slot, trust: Trust, key: tuple) -> list[Problem]:
    if value is None:
        return []
    if slot.many:
        if not isinstance(value, list):
            return [(key, f"expects a list of {slot.kind} components")]
        problems: list[Problem] = []
        for index, item in enumerate(value):
            problems += check(item, slot.kind, trust=trust, path=(*key, index))
        return problems
    return check(value, slot.kind, trust=trust, path=key)


def build(cfg: Mapping, kind: str, *, trust: Trust | None = None, **supplied: Any) -> Any:
    """Build a component of ``kind``; ``supplied`` are arguments baton passes itself
    (``params`` for an optimizer, ``optimizer`` for a scheduler). The mapping is not
    modified.

    Raises:
        ConfigError: Every problem :func:`check` finds, at once.
    """
    trust = trust or Trust.from_environment()
    problems = check(cfg, kind, trust=trust, supplied=supplied)
    if problems:
        lines = [
            f"{'.'.join(str(p) for p in path) or kind}: {message}" for path, message in problems
        ]
        raise ConfigError(f"cannot build {kind}: " + "; ".join(lines), lines)
    return _construct(cfg, kind, trust, supplied)


def _plain_copy(value: Any) -> Any:
    """A copy of the containers a config holds (dicts, lists, tuples), so that a
    constructor that changes its argument never changes the config (one validated config
    serves every task of a process); any other object is passed as it is."""
    if type(value) is dict:
        return {key: _plain_copy(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_plain_copy(item) for item in value)
    return value


def _construct(cfg: Mapping, kind: str, trust: Trust, supplied: Mapping[str, Any]) -> Any:
    factory = resolve(cfg["type"], kind, trust)
    params, _ = signature(factory)
    args: dict[str, Any] = {}
    for name, value in cfg.items():
        if name == "type" or name in _SCHEDULER_EXTRAS:
            continue
        param = params.get(name)
        if param is not None and param.slot is not None and value is not None:
            if param.slot.many:
                value = [_construct(item, param.slot.kind, trust, {}) for item in value]
            else:
                value = _construct(value, param.slot.kind, trust, {})
        elif param is not None and param.data_path:
            value = str(trust.check_data_path(str(value), f"{cfg['type']}'s {name}"))
        else:
            value = _plain_copy(value)
            if param is not None and param.adapter is not None:
                # Build with the checked values (a YAML list becomes the tuple a signature
                # asks for), so what was validated is what is passed.
                value = param.adapter.validate_python(value)
        args[name] = value
    return factory(**args, **supplied)


def build_scheduler(
    cfg: Mapping,
    optimizer: Any,
    *,
    epoch_length: int | None = None,
    max_epochs: int | None = None,
    max_iters: int | None = None,
    trust: Trust | None = None,
) -> schedulers._ParamScheduler:
    """Build one scheduler from an mmengine-style mapping (not modified).

    ``end`` defaults to ``max_epochs`` (epoch-based) or ``max_iters`` (iteration-based);
    ``convert_to_iter_based`` converts an epoch-based schedule with ``epoch_length``.

    Raises:
        ConfigError: Bad type or arguments, or a missing default.
    """
    trust = trust or Trust.from_environment()
    problems = check(cfg, "scheduler", trust=trust, supplied={"optimizer"})
    if problems:
        lines = [f"{'.'.join(str(p) for p in path)}: {message}" for path, message in problems]
        raise ConfigError("cannot build scheduler: " + "; ".join(lines), lines)
    cls = resolve(cfg["type"], "scheduler", trust)
    params, _ = signature(cls)
    args = {
        k: (params[k].adapter.validate_python(v) if k in params and params[k].adapter else v)
        for k, v in cfg.items()
        if k not in ("type", *_SCHEDULER_EXTRAS)
    }
    convert = bool(cfg.get("convert_to_iter_based", False))
    if convert and args.get("by_epoch", True) is False:
        raise ConfigError(f"{cls.__name__}: only an epoch-based scheduler can be converted")
    if "end" not in args:
        by_epoch = args.get("by_epoch", True)
        default = max_epochs if by_epoch else max_iters
        if default is None:
            unit = "max_epochs" if by_epoch else "max_iters"
            raise ConfigError(
                f"{cls.__name__} has no 'end' and {unit} is unknown: set 'end' or pass "
                f"dispatch_kwargs={{'{unit}': ...}}"
            )
        args["end"] = default
    if convert:
        return cls.build_iter_from_epoch(optimizer, epoch_length=epoch_length, **args)
    return cls(optimizer, **args)
