"""docs/architecture.md is true: every module, file and name it mentions exists, and every
module of the engine, the tasks and the flows appears in it."""

import importlib
import re
from pathlib import Path

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


def test_every_dotted_name_it_names_resolves():
    unresolved = []
    for dotted in DOTTED:
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for attribute in parts[cut:]:
                    obj = getattr(obj, attribute)
            except AttributeError:
                unresolved.append(dotted)
            break
        else:
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
