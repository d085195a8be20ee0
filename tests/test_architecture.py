"""docs/architecture.md is true: every module, file and name it mentions exists, every
module of the engine, the tasks and the flows appears in it, and its floor plan is the
engine's: the packages in the order ``tests/test_layering.py`` pins, and which imports
which."""

import importlib
import re
from pathlib import Path

from tests.test_layering import ENGINE, PACKAGES, import_graph, module_files

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
CODE = re.findall(r"`([^`\s]+)`", DOC)
# Paths, but not templates such as tasks/<verb>.py
PATHS = [
    c
    for c in CODE
    if re.match(r"^(baton|tasks|flows|deployments|configs|tests)/", c) and "<" not in c
]
DOTTED = [c for c in CODE if re.fullmatch(r"baton(\.[A-Za-z_][A-Za-z0-9_]*)+", c)]


def test_every_path_it_names_exists():
    missing = []
    for text in PATHS:
        path, _, name = text.partition(":")
        target = ROOT / path.strip()
        if not target.exists() or (
            name and not re.search(rf"\b(def|class) {name.strip()}\b", target.read_text())
        ):
            missing.append(text)
    assert PATHS and missing == []


def resolve(dotted: str) -> tuple[str, object]:
    """The longest importable module at the start of ``dotted``, and what the rest names in
    it.

    Raises:
        ImportError: No part of it is a module.
        AttributeError: The module has no such name.
    """
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return ".".join(parts[:cut]), obj
    raise ImportError(f"no part of {dotted!r} is a module")


def test_every_dotted_name_it_names_resolves():
    unresolved = []
    for dotted in DOTTED:
        try:
            resolve(dotted)
        except (ImportError, AttributeError):
            unresolved.append(dotted)
    assert DOTTED and unresolved == []


def test_every_module_of_the_engine_tasks_and_flows_is_in_it():
    modules = [
        p.relative_to(ROOT).as_posix()
        for folder in ("baton", "tasks", "flows")
        for p in (ROOT / folder).glob("*.py")
        if p.name not in ("__init__.py", "_version.py")
    ]
    packages = [
        p.relative_to(ROOT).as_posix() + "/"
        for p in (ROOT / "baton").iterdir()
        if (p / "__init__.py").exists()
    ]
    absent = [m for m in modules + packages if m not in DOC]
    assert absent == []


def _section(title: str) -> str:
    start = DOC.index(title)
    end = DOC.find("\n## ", start + len(title))
    return DOC[start : end if end != -1 else len(DOC)]


def test_the_floor_plan_is_the_order_the_layering_test_pins():
    drawing = _section("## The engine's floor plan").split("```")[1]
    drawn = re.findall(r"^(\w+)/ ", drawing, re.M)
    assert drawn == list(reversed(PACKAGES))


def test_which_package_imports_which_is_what_the_code_imports():
    rows = re.findall(
        r"^\| `baton/(\w+)/` \|([^|]*)\|$", _section("## The engine's floor plan"), re.M
    )
    documented = {package: set(re.findall(r"`(\w+)`", imports)) for package, imports in rows}
    graph = import_graph(module_files(ROOT, ENGINE), module_level=False)
    actual: dict[str, set[str]] = {package: set() for package in PACKAGES}
    for name, targets in graph.items():
        package = name.partition(".")[2].partition(".")[0]
        if package not in PACKAGES:
            continue
        for target in targets:
            other = target.partition(".")[2].partition(".")[0]
            if other in PACKAGES and other != package:
                actual[package].add(other)
    assert documented == actual
