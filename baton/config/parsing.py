"""Reading a config's YAML text within bounds, with the line and column of every key.

Configs also arrive from a web form, so the text is bounded before it is trusted: its
size, its nesting, and the YAML aliases that could expand a tiny text into gigabytes.
Every key's position is kept, so that each :class:`ConfigProblem` found later (by the
schema, the component checks or the overrides) names the line to fix.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml

from baton.errors import ConfigError

# Limits on what a config file may be; configs also arrive from a web form.
MAX_CONFIG_BYTES = 1 << 20
MAX_NESTING = 32
MAX_STRING = 4096
# YAML aliases share a node; expanding them can multiply a tiny text into gigabytes
# (a "billion laughs"). Both the number of aliases and the expanded size are bounded.
MAX_ALIASES = 64
MAX_EXPANDED_NODES = 100_000
MAX_OVERRIDES = 256


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a config."""

    path: str
    message: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        where = f" (line {self.line}, column {self.column})" if self.line else ""
        return f"{self.path or '<top level>'}{where}: {self.message}"


# Key path (keys and list indices) -> (line, column), both counted from 1.
Positions = dict[tuple, tuple[int, int]]


def dotted(path: Iterable) -> str:
    """A key path as the dotted string problems show (``param_scheduler.0.end``)."""
    return ".".join(str(p) for p in path)


def locate(path: tuple, positions: Positions) -> tuple[int | None, int | None]:
    """The line and column of ``path``, or of its nearest parent that has one."""
    for end in range(len(path), -1, -1):
        if path[:end] in positions:
            return positions[path[:end]]
    return None, None


def summary(source: str, problems: list[ConfigProblem]) -> str:
    """The message of a :class:`ConfigError` that lists ``problems``."""
    count = len(problems)
    lines = [f"{source}: {count} problem{'s' if count != 1 else ''} in the config:"]
    lines += [f"  - {p}" for p in problems]
    return "\n".join(lines)


def parse_yaml(text: str, source: str = "<config>") -> tuple[dict, Positions]:
    """Parse YAML text into a mapping and the line/column of every key.

    Raises:
        ConfigError: Syntax errors (with their line), a document that is not a mapping,
            duplicate keys, or a document too large or too deep.
    """
    if len(text.encode("utf-8", errors="replace")) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: config is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        node, data = load_bounded(text, source)
    except ConfigError:
        raise
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
        problem = ConfigProblem("", f"YAML syntax error: {err.problem or err}", line, column)
        raise ConfigError(f"{source}: {problem}", [problem]) from err
    except (yaml.YAMLError, RecursionError, ValueError) as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: a config must be a mapping of keys to values, found a {type(data).__name__}"
        )
    positions: Positions = {}
    problems: list[ConfigProblem] = []
    if node is not None:
        _positions(node, (), positions, problems, 0)
    if problems:
        raise ConfigError(summary(source, problems), problems)
    return data, positions


def _positions(node: yaml.Node, path: tuple, out: Positions, problems: list, depth: int) -> None:
    if depth > MAX_NESTING:
        raise ConfigError(
            f"config nests deeper than {MAX_NESTING} levels at {dotted(path)}",
            [ConfigProblem(dotted(path), f"nested deeper than {MAX_NESTING} levels")],
        )
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        for key_node, value_node in node.value:
            key = key_node.value
            child = (*path, key)
            mark = key_node.start_mark
            if key in seen:
                problems.append(
                    ConfigProblem(
                        dotted(child),
                        "duplicate key (the later one would silently win)",
                        mark.line + 1,
                        mark.column + 1,
                    )
                )
            seen.add(key)
            out[child] = (mark.line + 1, mark.column + 1)
            _positions(value_node, child, out, problems, depth + 1)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*path, index)
            out[child] = (item.start_mark.line + 1, item.start_mark.column + 1)
            _positions(item, child, out, problems, depth + 1)


def load_bounded(text: str, source: str) -> tuple[yaml.Node | None, Any]:
    """Compose and construct one YAML document, refusing alias expansion bombs.

    Aliases are counted in the event stream (linear in the text) and the size of the
    document once every alias is expanded is computed over the shared node graph, so a
    hostile text is refused before anything walks the expanded tree.
    """
    if _flow_depth(text) > 2 * MAX_NESTING:
        # PyYAML's scanner takes time quadratic in the depth of [ and { nesting.
        raise ConfigError(_too_deep(source))
    aliases = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            aliases += 1
            if aliases > MAX_ALIASES:
                raise ConfigError(
                    f"{source}: more than {MAX_ALIASES} YAML aliases (*name); write the values out"
                )
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _expanded_size(node, {}, set(), source, 0)
        data = loader.construct_document(node) if node is not None else None
    except RecursionError as err:  # the composer recurses once per level
        raise ConfigError(_too_deep(source)) from err
    finally:
        loader.dispose()
    return node, data


def _flow_depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` in ``text``, in one pass (brackets inside quoted
    strings count too: the caller allows twice the real limit for them)."""
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(depth - 1, 0)
    return deepest


def _too_deep(source: str) -> str:
    return f"{source}: the config nests deeper than {MAX_NESTING} levels; flatten it"


def check_depth(value: Any, source: str) -> None:
    """Refuse a mapping or list nested deeper than :data:`MAX_NESTING` (walked without
    recursion, so any depth is refused, not crashed on)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_NESTING:
            raise ConfigError(_too_deep(source))
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        )
        stack.extend((child, depth + 1) for child in children)


def _expanded_size(
    node: yaml.Node, sizes: dict[int, int], active: set[int], source: str, depth: int
) -> int:
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in active:
        raise ConfigError(f"{source}: a YAML alias refers to itself (a recursive document)")
    if depth > MAX_NESTING:
        raise ConfigError(_too_deep(source))
    active.add(key)
    total = 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            total += _expanded_size(key_node, sizes, active, source, depth + 1)
            total += _expanded_size(value_node, sizes, active, source, depth + 1)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            total += _expanded_size(item, sizes, active, source, depth + 1)
    active.discard(key)
    if total > MAX_EXPANDED_NODES:
        raise ConfigError(
            f"{source}: the config expands to more than {MAX_EXPANDED_NODES} values "
            "(YAML aliases); write it out plainly"
        )
    sizes[key] = total
    return total
