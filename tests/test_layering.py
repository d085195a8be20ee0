"""Imports flow one way: flows -> tasks -> baton. The engine never imports Prefect."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_ENGINE = ("prefect", "tasks", "flows")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_engine_sources_never_import_upper_layers():
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imports(path) & set(FORBIDDEN_IN_ENGINE))
        for path in (ROOT / "baton").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_tasks_never_import_flows():
    offenders = [
        str(p.relative_to(ROOT)) for p in (ROOT / "tasks").rglob("*.py") if "flows" in _imports(p)
    ]
    assert offenders == []


def test_importing_the_engine_loads_no_prefect():
    code = (
        "import sys, baton, baton.config, baton.loop, baton.data\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('prefect', 'tasks', 'flows')]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
