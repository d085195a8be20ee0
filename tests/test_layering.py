"""Imports flow one way: flows -> tasks -> baton, and inside the engine, package by package.

``flows/`` and ``tasks/`` install as ``baton.flows`` and ``baton.tasks``; the engine is every
other ``baton`` module. The engine's packages are stacked in :data:`PACKAGES` order: each
imports only the shared modules and the packages below it (``docs/architecture.md`` draws
them), and no module imports itself back through others, not even for type annotations.
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UPPER_LAYERS = ("baton.tasks", "baton.flows")

# The engine's packages, lowest first: a package imports only those before it.
PACKAGES = (
    "trust",
    "checkpoint",
    "experiment",
    "tracking",
    "data",
    "optim",
    "build",
    "engine",
    "config",
    "run",
)
# Small modules below every package: they import no package of baton.
SHARED = ("_version", "_moved", "errors", "lifetime", "randomness", "kinds", "models", "markdown")


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
        "import sys, baton, baton.config, baton.run.pipeline, baton.data\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('prefect', 'tasks', 'flows')\n"
        "       or m.startswith(('baton.tasks', 'baton.flows'))]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- the engine's packages, and circles ---------------------------------------------------


def module_files(root: Path, folders: dict[str, str]) -> dict[str, Path]:
    """Every module under ``folders`` (folder -> dotted package name), by dotted name."""
    found = {}
    for folder, package in folders.items():
        for path in (root / folder).rglob("*.py"):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _statements(tree: ast.Module, module_level: bool):
    """The import statements of a module: all of them, or only those that run when it is
    imported (at module level, in ``if TYPE_CHECKING:`` blocks and class bodies too, but
    not inside functions)."""
    if not module_level:
        yield from (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)))
        return
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            pending += [c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt)]


def import_graph(modules: dict[str, Path], *, module_level: bool) -> dict[str, set[str]]:
    """Which of ``modules`` each one imports. ``from p import x`` is an edge to ``p.x`` when
    that is a module, else to ``p``; importing ``p.q`` also runs the packages above it that
    are not the importer's own (their ``__init__``)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in _statements(ast.parse(path.read_text()), module_level):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        edges = set()
        for target in targets:
            parts = target.split(".")
            for cut in range(1, len(parts) + 1):
                above = ".".join(parts[:cut])
                if above in modules and not (name == above or name.startswith(above + ".")):
                    edges.add(above)
        graph[name] = edges
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle through each group of modules that import each other (Tarjan's strongly
    connected components), as a list of names that ends where it starts."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph[node]:
                groups.append(set(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_path_through(group, graph) for group in groups]


def _path_through(group: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A circle inside ``group``: from its first member, breadth first back to it."""
    start = min(group)
    came_from = {start: None}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node] & group):
            if nxt == start:
                path = [node]
                while came_from[path[-1]] is not None:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if nxt not in came_from:
                came_from[nxt] = node
                queue.append(nxt)
    raise AssertionError(f"no circle in {sorted(group)}")


def _files(names: list[str], modules: dict[str, Path], root: Path) -> str:
    return " -> ".join(modules[n].relative_to(root).as_posix() for n in names)


def layer_of(name: str) -> int | None:
    """The engine layer of a module: -1 for a shared one, a package's index, ``None`` for
    ``baton`` itself (the public API, above every package) and the upper layers."""
    parts = name.split(".")
    if len(parts) < 2 or parts[1] in ("tasks", "flows"):
        return None
    if parts[1] in SHARED:
        return -1
    return PACKAGES.index(parts[1]) if parts[1] in PACKAGES else None


def upward_imports(modules: dict[str, Path], graph: dict[str, set[str]], root: Path) -> list[str]:
    """Every import of a package above the importer's, or of ``baton`` itself, as
    ``file -> imported file``; shared modules may import only shared modules."""
    found = []
    for name, targets in graph.items():
        layer = layer_of(name)
        if layer is None:
            continue
        for target in sorted(targets):
            above = layer_of(target)
            if above is None or above > layer or (layer == -1 and above != -1):
                found.append(_files([name, target], modules, root))
    return found


ENGINE = {"baton": "baton"}
EVERYTHING = {"baton": "baton", "tasks": "baton.tasks", "flows": "baton.flows"}


def test_the_engine_is_its_shared_modules_and_packages():
    """Every module of ``baton/`` is a shared module or inside a package of PACKAGES (a new
    top-level module or package must take its place in the order first)."""
    top = {p.stem for p in (ROOT / "baton").glob("*.py")} - {"__init__"}
    packages = {p.name for p in (ROOT / "baton").iterdir() if (p / "__init__.py").exists()}
    assert (top, packages) == (set(SHARED), set(PACKAGES))


def test_each_package_imports_only_the_packages_below_it():
    modules = module_files(ROOT, ENGINE)
    graph = import_graph(modules, module_level=False)  # a function-local import counts too
    assert upward_imports(modules, graph, ROOT) == []


def test_no_module_imports_itself_back():
    modules = module_files(ROOT, EVERYTHING)
    found = circles(import_graph(modules, module_level=True))
    assert [_files(c, modules, ROOT) for c in found] == []


def test_the_checks_name_the_files_of_a_circle_and_of_an_upward_import(tmp_path):
    """The two checks above can fail: a circle through a type-checking import, and a
    package that imports one above it, each named by its files."""
    files = {
        "baton/__init__.py": "",
        "baton/errors.py": "",
        "baton/trust/__init__.py": "",
        "baton/trust/allowances.py": "from baton.run import steps\n",
        "baton/run/__init__.py": "",
        "baton/run/steps.py": "from baton.run.live import Pipeline\n",
        "baton/run/live.py": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n"
            "    from baton.run.steps import resume\n"
            "def later():\n"
            "    from baton import errors\n"
        ),
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    modules = module_files(tmp_path, ENGINE)
    found = circles(import_graph(modules, module_level=True))
    assert [_files(c, modules, tmp_path) for c in found] == [
        "baton/run/live.py -> baton/run/steps.py -> baton/run/live.py"
    ]
    graph = import_graph(modules, module_level=False)
    assert upward_imports(modules, graph, tmp_path) == [
        "baton/trust/allowances.py -> baton/run/__init__.py",
        "baton/trust/allowances.py -> baton/run/steps.py",
    ]
