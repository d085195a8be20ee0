"""The wheel puts only the ``baton`` name into site-packages, so a project's own ``tasks`` or
``flows`` package and baton's live side by side, whichever comes first on ``sys.path``."""

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

USER_CHECK = """
import sys
import tasks, flows
from baton import tasks as baton_tasks
from baton.flows import train
assert tasks.OWNER == "user" and flows.OWNER == "user", (tasks.__file__, flows.__file__)
assert baton_tasks.train_epoch.name and train.train_pipeline.name
site = sys.argv[1]
for module in (baton_tasks, train):
    assert module.__file__.startswith(site), module.__file__
print("both import")
"""


def _site_packages(venv: Path) -> Path:
    paths = sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})
    return Path(paths["purelib"])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (a build in place would race other tests)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("baton", "tasks", "flows"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps"),
            *("--no-build-isolation", "--wheel-dir", str(out), str(src)),
        ],
        check=True,
    )
    (built,) = out.glob("baton-*.whl")
    return built


def test_wheel_installs_only_the_baton_name_next_to_a_users_tasks_package(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = _site_packages(venv)
    before = {p.name for p in site.iterdir()}
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "--python", str(python), "install"),
            *("--quiet", "--no-deps", "--no-index", str(wheel)),
        ],
        check=True,
    )
    added = {p.name for p in site.iterdir()} - before
    assert {name for name in added if not name.endswith(".dist-info")} == {"baton"}
    # baton's dependencies come from this test's own environment, appended after the new site
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    project = tmp_path / "project"  # a user's project: Celery's tasks.py and a flows/ package
    (project / "flows").mkdir(parents=True)
    (project / "tasks.py").write_text('OWNER = "user"\n')
    (project / "flows" / "__init__.py").write_text('OWNER = "user"\n')
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(
        [str(python), "-c", USER_CHECK, str(site)],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "both import"

    # the console script and `python -m` both reach baton's CLI from inside that project
    for command in (
        [str(venv / "bin" / "baton"), "--help"],
        [str(python), "-m", "baton.flows.cli", "--help"],
    ):
        result = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "usage: baton" in result.stdout
