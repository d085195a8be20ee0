"""Nothing breaks for users when modules move: every name the README and the docs show
imports at its path, and every old module path still imports for one release, as the very
module that moved, with a DeprecationWarning naming its new path (``baton/_moved.py``)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from baton import _moved
from baton.build import build, resolve
from baton.optim.schedulers import StepLR
from baton.trust import Trust
from tests.test_architecture import resolve as resolve_dotted

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _shown_names() -> list[str]:
    """Dotted names in backticks, and ``from baton... import ...`` lines of code blocks
    (but the README's note on moved modules, which names the old paths)."""
    names = []
    for doc in DOCS:
        text = re.sub(
            r"\*\*Moved modules\.\*\*.*?\n\n", "", doc.read_text(encoding="utf-8"), flags=re.S
        )
        names += re.findall(r"`(baton(?:\.[A-Za-z_][A-Za-z0-9_]*)+)`", text)
        for module, imported in re.findall(r"^\s*from (baton[\w.]*) import ([\w, ]+)$", text, re.M):
            names += [f"{module}.{name.strip()}" for name in imported.split(",")]
    return sorted(set(names))


def test_the_docs_show_names_at_their_new_paths():
    shown = _shown_names()
    assert "baton.SingleDeviceStrategy" in shown and "baton.optim.OptimWrapper" in shown
    for dotted in shown:
        module, _ = resolve_dotted(dotted)
        assert _moved.new_path(module) is None, f"{dotted}: the docs name an old path"


OLD_PATHS = """
import importlib, warnings
from baton import _moved
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import baton.control
assert [w.filename for w in caught] == ["<string>"], caught  # the warning names the importing line
for old, new in sorted(_moved.MOVED.items() - {("baton.control", "baton.run.control")}):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is importlib.import_module(new), old
    assert module.__name__ == new and module.__spec__.name == new, old
    messages = [str(w.message) for w in caught if w.category is DeprecationWarning]
    assert messages == [f"{old} moved to {new}; import {new} (the old path goes in the next release, see CHANGELOG.md)"], (old, messages)
import baton
from baton.strategy import SingleDeviceStrategy
assert SingleDeviceStrategy is baton.SingleDeviceStrategy
assert baton.pipeline is importlib.import_module("baton.run.pipeline")
import baton.schedulers.base, baton.optim.schedulers.base
assert baton.schedulers.base is baton.optim.schedulers.base
assert baton.resume_policy.fork is importlib.import_module("baton.run.resume_policy.fork")
print("ok")
"""


def test_every_old_module_path_is_the_moved_module_with_a_warning():
    out = subprocess.run(
        [sys.executable, "-c", OLD_PATHS], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_importing_baton_and_its_public_names_warns_nothing():
    code = (
        "import warnings; warnings.simplefilter('error')\n"
        "from baton import SingleDeviceStrategy, CheckpointStore, OptimWrapper\n"
        "import baton.config, baton.run.pipeline, baton.data, baton.build, baton.trust\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the warning: the test above
@pytest.mark.parametrize(
    ("kind", "old", "new"),
    [
        ("scheduler", "baton.schedulers.StepLR", "StepLR"),
        ("dataset", "baton.datasets.ImageFolder", "ImageFolder"),
        ("model", "baton.models.MLP", "MLP"),
        ("dataset", "baton.data.DigitsDataset", "DigitsDataset"),
    ],
)
def test_a_config_that_names_an_old_dotted_type_builds_the_same_class(kind, old, new):
    """A ``type:`` resolves by module path, under the ``baton`` prefix the operator's
    allow-list always has; a class defined in the moved module passes the
    defining-module check too."""
    assert resolve(old, kind, Trust()) is resolve(new, kind, Trust())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_an_old_scheduler_path_builds_with_its_arguments_checked():
    import torch

    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    built = build(
        {"type": "baton.schedulers.StepLR", "step_size": 2, "end": 4},
        "scheduler",
        trust=Trust(),
        optimizer=optimizer,
    )
    assert type(built) is StepLR


def test_python_m_on_an_old_path_runs_the_moved_module():
    out = subprocess.run(
        [sys.executable, "-m", "baton.example_data", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0 and "digits-images" in out.stdout, out.stderr
