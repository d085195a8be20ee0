"""Imports flow one way: flows -> tasks -> baton. The engine never imports Prefect.

``flows/`` and ``tasks/`` install as ``baton.flows`` and ``baton.tasks``; the engine is every
other ``baton`` module.
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UPPER_LAYERS = ("baton.tasks", "baton.flows")


def _imports(path: Path) -> set[str]:
    """The dotted names a file imports, each with its parents ('a.b.c' gives a, a.b, a.b.c)."""
    tree = ast.parse(path.read_text())
    modules = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.append(node.module)
            modules += [f"{node.module}.{alias.name}" for alias in node.names]
    names = set()
    for module in modules:
        parts = module.split(".")
        names |= {".".join(parts[: i + 1]) for i in range(len(parts))}
    return names


def test_engine_sources_never_import_upper_layers():
    forbidden = {"prefect", "tasks", "flows", *UPPER_LAYERS}
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imports(path) & forbidden)
        for path in (ROOT / "baton").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_tasks_never_import_flows():
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "tasks").rglob("*.py")
        if _imports(p) & {"flows", "baton.flows"}
    ]
    assert offenders == []


def test_upper_layers_import_each_other_only_through_the_baton_namespace():
    """A bare ``import tasks`` would load a second copy of the module (or a user's ``tasks``)."""
    offenders = [
        str(p.relative_to(ROOT))
        for folder in ("tasks", "flows", "baton")
        for p in (ROOT / folder).rglob("*.py")
        if _imports(p) & {"tasks", "flows"}
    ]
    assert offenders == []


def test_importing_the_engine_loads_no_prefect():
    code = (
        "import sys, baton, baton.config, baton.loop, baton.data\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('prefect', 'tasks', 'flows')\n"
        "       or m.startswith(('baton.tasks', 'baton.flows'))]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
