"""What a config may pass to a component: its parameters, read from the signature, and
the check of each plain argument against them.

:mod:`baton.build.registry` resolves a ``type`` and walks a component's arguments; this module
answers, for one resolved class or registered function, which arguments it takes
(following ``**kwargs`` up the class tree), which of them are slots for a nested
component or data paths, and whether a plain value fits the parameter's annotation
(pydantic). Nested components are checked by :func:`baton.build.check` itself, so the
recursion over a config stays in one module.
"""

import functools
import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import ConfigDict, TypeAdapter, ValidationError
from torch import nn

from baton.errors import UntrustedInputError, short_repr
from baton.kinds import DataPath, Slot
from baton.trust.allowances import Trust

# A problem found in a component: the key path below the component, and the message.
Problem = tuple[tuple, str]

# Slots of classes baton does not own (their signatures carry no markers). torchvision
# is not a dependency; an operator who installs it allows e.g.
# BATON_ALLOWED_MODULES=torchvision.datasets.folder,torchvision.transforms.v2.
_FOLDER_SLOTS: dict[str, Slot | DataPath] = {
    "root": DataPath(),
    "transform": Slot("transform"),
    "target_transform": Slot("transform"),
    "loader": Slot("loader"),
    "is_valid_file": Slot("loader"),
}
_MANY_TRANSFORMS: dict[str, Slot | DataPath] = {"transforms": Slot("transform", many=True)}
EXTERNAL_SLOTS: dict[str, dict[str, Slot | DataPath]] = {
    "torchvision.datasets.folder.ImageFolder": _FOLDER_SLOTS,
    "torchvision.datasets.folder.DatasetFolder": _FOLDER_SLOTS,
    **{
        f"torchvision.transforms.v2._container.{name}": _MANY_TRANSFORMS
        for name in ("Compose", "RandomApply", "RandomChoice", "RandomOrder")
    },
}


@dataclass(frozen=True)
class Param:
    """One parameter a config may set: how its value is checked, whether it is required,
    and whether it is a slot for a component or a data path."""

    name: str
    adapter: TypeAdapter | None
    required: bool
    slot: Slot | None
    data_path: bool = False


_LAX = ConfigDict(arbitrary_types_allowed=True)


def _adapter(annotation: Any) -> TypeAdapter | None:
    if annotation is inspect.Parameter.empty or annotation is Any or isinstance(annotation, str):
        return None
    try:
        return TypeAdapter(annotation, config=_LAX)
    except Exception:
        try:
            return TypeAdapter(annotation)
        except Exception:
            # An annotation pydantic cannot check (a forward reference, a protocol):
            # the argument is passed through and the constructor checks it.
            return None


def _marker(annotation: Any, kind: type) -> Any:
    if typing.get_origin(annotation) is Annotated:
        return next((m for m in annotation.__metadata__ if isinstance(m, kind)), None)
    return None


def _hints(func: Callable) -> dict[str, Any]:
    try:
        return typing.get_type_hints(func, include_extras=True)
    except Exception:
        return {}


@functools.cache
def signature(factory: Any) -> tuple[dict[str, Param], bool]:
    """The parameters a config may set, and whether unknown keyword arguments pass."""
    functions: list[Callable] = []
    if inspect.isclass(factory):
        # Walk __init__ up the class tree while it forwards **kwargs (mmengine-style
        # schedulers and many modules do), so forwarded arguments are checked too.
        for klass in factory.__mro__:
            if klass in (object, nn.Module) or "__init__" not in vars(klass):
                continue
            functions.append(klass.__init__)
            params = inspect.signature(klass.__init__).parameters.values()
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                break
    else:
        functions.append(factory)
    external = EXTERNAL_SLOTS.get(_qualified(factory), {})
    found: dict[str, Param] = {}
    takes_any = False
    for index, func in enumerate(functions):
        try:
            sig = inspect.signature(func)
        except (TypeError, ValueError):
            return {}, True
        hints = _hints(func)
        for name, param in sig.parameters.items():
            if name == "self" or name in found:
                continue
            if param.kind is param.VAR_KEYWORD:
                takes_any = index == len(functions) - 1
                continue
            if param.kind is param.VAR_POSITIONAL:
                continue
            annotation = hints.get(name, param.annotation)
            marker = external.get(name)
            slot = marker if isinstance(marker, Slot) else _marker(annotation, Slot)
            data_path = isinstance(marker, DataPath) or _marker(annotation, DataPath) is not None
            found[name] = Param(
                name,
                None if slot else _adapter(annotation),
                param.default is param.empty and param.kind is not param.POSITIONAL_ONLY,
                slot,
                data_path,
            )
    return found, takes_any


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"


def _looks_like_component(value: Any) -> bool:
    if isinstance(value, Mapping):
        return "type" in value or any(_looks_like_component(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_looks_like_component(v) for v in value)
    return False


def _error_text(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return first["msg"] + (f" at {where}" if where else "")


def unknown_argument(
    type_name: str, name: str, value: Any, accepted: list[str], takes_any: bool, key: tuple
) -> list[Problem]:
    """An argument the target's signature does not name: an error, unless the target
    takes ``**kwargs``, which may still never receive a component."""
    if not takes_any:
        return [(key, f"{type_name} has no argument {name!r}; it accepts {', '.join(accepted)}")]
    if _looks_like_component(value):
        return [(key, "a component cannot go here: this argument is not a slot")]
    return []


def check_plain_argument(
    type_name: str, name: str, value: Any, param: Param | None, trust: Trust, key: tuple
) -> list[Problem]:
    """One argument the target takes that is not a slot (``param`` is None for a
    builder's extra such as ``convert_to_iter_based``): never a nested component, a data
    path only where the operator allows, any other value by the parameter's annotation."""
    if _looks_like_component(value):
        return [(key, f"{type_name}'s {name!r} is not a slot for a component; give a plain value")]
    if param is not None and param.data_path:
        try:
            trust.check_data_path(str(value), f"{type_name}'s {name}")
        except UntrustedInputError as err:
            return [(key, str(err))]
    elif param is not None and param.adapter is not None:
        try:
            param.adapter.validate_python(value)
        except ValidationError as err:
            return [(key, f"{_error_text(err)}; found {short_repr(value)}")]
    return []
