"""Dotted-key overrides of a config: ``--set train.max_epochs=5`` and their mapping form.

Overrides are applied to the raw mapping before validation, so an overridden value is
checked by the schema exactly as if the file had said it. Values are read as YAML
(``lr=0.01`` is a float, ``hidden=[4, 4]`` a list), within the same bounds as a file.
"""

import json
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from baton.config.parsing import MAX_NESTING, MAX_OVERRIDES, MAX_STRING, load_bounded
from baton.errors import ConfigError, short_repr

# The run's settings that are parameters of their own (flow parameters, CLI flags).
RUN_SETTINGS = ("experiment_name", "resume", "work_dir", "fork", "nproc")
# The config key of a run setting that is not a top-level key.
_SETTING_KEYS = {"nproc": "launcher.nproc"}


def run_settings(overrides: Iterable[str] | None = None, **named: Any) -> dict[str, Any]:
    """The overrides a run applies to its config: ``key.path=value`` strings, then the
    run's own settings (:data:`RUN_SETTINGS`) where they are given (not ``None``).

    Raises:
        ConfigError: A malformed override, or a named setting that is not a run setting.
    """
    unknown = sorted(set(named) - set(RUN_SETTINGS))
    if unknown:
        raise ConfigError(f"unknown run settings {unknown}; use {', '.join(RUN_SETTINGS)}")
    settings = parse_overrides(overrides or [])
    settings.update(
        {_SETTING_KEYS.get(key, key): value for key, value in named.items() if value is not None}
    )
    return settings


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``key.path=value`` strings; values are read as YAML (typed).

    Raises:
        ConfigError: An item without ``=`` or with a value that is not valid YAML.
    """
    parsed: dict[str, Any] = {}
    for count, item in enumerate(items, 1):
        if count > MAX_OVERRIDES:
            raise ConfigError(f"more than {MAX_OVERRIDES} overrides; put them in a config file")
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {short_repr(item)} must look like key.path=value")
        if len(item) > MAX_STRING:
            raise ConfigError(f"override {short_repr(item)} is longer than {MAX_STRING} characters")
        key, _, raw = item.partition("=")
        try:
            parsed[key.strip()] = (
                load_bounded(raw, f"override {key.strip()!r}")[1] if raw.strip() else ""
            )
        except yaml.YAMLError as err:
            raise ConfigError(f"override {short_repr(item)}: value is not valid YAML") from err
    return parsed


def apply_overrides(data: dict, overrides: Mapping[str, Any] | Iterable[str]) -> dict:
    """Return a copy of ``data`` with dotted-key overrides applied.

    ``overrides`` is a mapping (``{'train.max_epochs': 5}``) or ``key=value`` strings
    (``'optim_wrapper.optimizer.lr=0.01'``, see :func:`parse_overrides`). Integers index
    into lists (``param_scheduler.0.end=3``). Values are checked by the schema afterwards.

    Raises:
        ConfigError: A malformed override, a key path deeper than a config may nest, or a
            path through a non-container.
    """
    result = json.loads(json.dumps(data, default=str))
    pairs = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
    for key, value in pairs.items():
        parts = str(key).split(".")
        if not key or any(not p for p in parts):
            raise ConfigError(f"override key {short_repr(key)} is empty or has an empty part")
        if len(parts) > MAX_NESTING:
            # The value would nest deeper than a config file may; refused before the walk
            # builds it (a deep enough one would end in a RecursionError, a retried fault).
            raise ConfigError(
                f"override key {short_repr(key)} has {len(parts)} parts, deeper than "
                f"{MAX_NESTING} levels; a config nests at most {MAX_NESTING} levels deep"
            )
        target: Any = result
        for depth, part in enumerate(parts[:-1]):
            target = _step_into(target, part, parts[: depth + 1], create=True)
        last = parts[-1]
        if isinstance(target, list):
            index = _index(last, target, parts)
            target[index] = value
        elif isinstance(target, dict):
            target[last] = value
        else:
            raise ConfigError(f"override {key!r}: {'.'.join(parts[:-1])} is not a mapping")
    return result


def _index(part: str, target: list, parts: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(target):
        raise ConfigError(
            f"override {'.'.join(parts)!r}: {part!r} is not an index of a list of {len(target)}"
        )
    return int(part)


def _step_into(target: Any, part: str, parts: list[str], *, create: bool) -> Any:
    if isinstance(target, list):
        return target[_index(part, target, parts)]
    if isinstance(target, dict):
        if part not in target or target[part] is None:
            if not create:
                raise ConfigError(f"override {'.'.join(parts)!r}: no such key")
            target[part] = {}
        return target[part]
    raise ConfigError(f"override {'.'.join(parts)!r}: {'.'.join(parts[:-1])} is not a mapping")
