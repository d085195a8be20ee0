"""The engine's old module paths, kept for one release.

The engine's flat modules were grouped into packages (``CHANGELOG.md``, "Moved modules"):
``baton.strategy`` is ``baton.engine.strategy`` now, ``baton.pipeline`` is
``baton.run.pipeline``, and so on (:data:`MOVED`). Importing an old path, or one of its submodules, gives the module at the new
path itself, with a ``DeprecationWarning`` naming that path: the same module object, so its
classes, ``isinstance`` checks and monkeypatches are shared, and a config's ``type:`` that
names an old dotted path builds the same class. ``python -m`` an old path runs the new one.

The old paths that became packages (``baton.config``, ``baton.build``, ``baton.data``,
``baton.trust``, ``baton.experiment``) need nothing here: each package exports what the
module did. This module, and its finder, go in the release after the one that moved them.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import CodeType, ModuleType

# old path -> new path; a submodule of an old path moved with it
MOVED = {
    "baton.assemble": "baton.engine.assemble",
    "baton.build_args": "baton.build.args",
    "baton.config_checks": "baton.config.checks",
    "baton.config_overrides": "baton.config.overrides",
    "baton.config_yaml": "baton.config.parsing",
    "baton.control": "baton.run.control",
    "baton.convert": "baton.engine.convert",
    "baton.datasets": "baton.data.datasets",
    "baton.environment": "baton.engine.environment",
    "baton.example_data": "baton.data.example_data",
    "baton.interrupt": "baton.run.interrupt",
    "baton.loop": "baton.run.loop",
    "baton.metrics": "baton.experiment.metrics",
    "baton.pipeline": "baton.run.pipeline",
    "baton.quotas": "baton.trust.quotas",
    "baton.restarts": "baton.experiment.restarts",
    "baton.resume_policy": "baton.run.resume_policy",
    "baton.schedulers": "baton.optim.schedulers",
    "baton.steps": "baton.run.steps",
    "baton.strategy": "baton.engine.strategy",
    "baton.transforms": "baton.data.transforms",
}


def new_path(name: str) -> str | None:
    """Where the module ``name`` lives now, or ``None`` if it did not move."""
    for old, new in MOVED.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    return None


def _warn(old: str, new: str) -> None:
    # stacklevel 3: past this function and the loader's method to the line that imports
    # (warnings skips the import system's own frames)
    warnings.warn(
        f"{old} moved to {new}; import {new} (the old path goes in the next release, "
        "see CHANGELOG.md)",
        DeprecationWarning,
        stacklevel=3,
    )


class _Alias(importlib.abc.Loader):
    """Loads an old path as the module at its new path."""

    def __init__(self, new: str) -> None:
        self.new = new
        self._spec = None

    def create_module(self, spec) -> ModuleType:
        _warn(spec.name, self.new)
        module = importlib.import_module(self.new)
        self._spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The import system set the module's __spec__ to the old path's; it keeps its own.
        module.__spec__ = self._spec

    def get_code(self, fullname: str) -> CodeType | None:
        """The new module's code, for ``python -m <old path>``."""
        _warn(fullname, self.new)
        return importlib.util.find_spec(self.new).loader.get_code(self.new)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path=None, target=None):
        new = new_path(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    """Put the finder of old paths first (once per process)."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def moved_attribute(name: str) -> ModuleType:
    """``baton.<name>`` for an old top-level module that ``import baton`` no longer loads.

    Raises:
        AttributeError: ``name`` is not an old module of baton.
    """
    if f"baton.{name}" not in MOVED:
        raise AttributeError(f"module 'baton' has no attribute {name!r}")
    return importlib.import_module(f"baton.{name}")
