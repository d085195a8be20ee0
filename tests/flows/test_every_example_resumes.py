"""Every shipped example continues: each config in ``configs/`` trained one epoch, then
continued to two in a new process, ends bitwise equal to a straight two-epoch run, and
``baton evaluate`` scores its checkpoint in another new process. A new example that cannot
resume (a model whose lazy parameters a fresh process cannot load, say) fails here."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from baton.data.example_data import write_digits_images

from .helpers import assert_same_training_result, final_checkpoint, run_env

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning"),
]
ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# The data folders examples read, and how the test makes each (as the Makefile does).
EXAMPLE_DATA = {"data/digits_images": write_digits_images}

RUN = """
import json, sys
from baton.run import pipeline as pl
from baton.config import load_config
pl.run(load_config(sys.argv[1], json.loads(sys.argv[2])))
"""


def test_every_config_is_covered():
    assert {p.name for p in CONFIGS} >= {"digits_mlp.yaml", "digits_cnn.yaml", "digits_images.yaml"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("example-data")


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory) -> dict[str, str]:
    return run_env(tmp_path_factory.mktemp("prefect_home"))


def data_overrides(config: Path, data_dir: Path) -> list[str]:
    """The example's data roots pointed at copies made under ``data_dir``."""
    raw = yaml.safe_load(config.read_text())
    overrides = []
    for split in ("train_data", "val_data"):
        root = ((raw.get(split) or {}).get("dataset") or {}).get("root")
        if root is None:
            continue
        folder = next((f for f in EXAMPLE_DATA if root.startswith(f)), None)
        if folder is None:
            pytest.fail(f"{config.name} reads {root}: add how to make it to EXAMPLE_DATA")
        made = EXAMPLE_DATA[folder](data_dir / Path(folder).name)
        overrides.append(f"{split}.dataset.root={made}{root[len(folder) :]}")
    return overrides


def run_in_new_process(config: Path, overrides: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-c", RUN, str(config), json.dumps(overrides)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize(
    "config",
    CONFIGS,
    ids=[p.stem for p in CONFIGS],
)
def test_the_example_continues_in_a_new_process_bitwise(config, tmp_path, data_dir, prefect_env):
    common = [f"work_dir={tmp_path}", *data_overrides(config, data_dir)]
    resumed = [*common, "experiment_name=resumed"]
    run_in_new_process(config, [*resumed, "train.max_epochs=1"])
    run_in_new_process(config, [*resumed, "train.max_epochs=2"])
    straight = [*common, "experiment_name=straight", "train.max_epochs=2"]
    run_in_new_process(config, straight)
    resumed_end = final_checkpoint({"work_dir": str(tmp_path), "experiment_name": "resumed"})
    straight_end = final_checkpoint({"work_dir": str(tmp_path), "experiment_name": "straight"})
    assert resumed_end["meta"]["epoch"] == 2
    assert_same_training_result(straight_end, resumed_end)

    # `baton evaluate` in a new process scores the checkpoint as the run did.
    checkpoint = tmp_path / "resumed" / "checkpoints" / "epoch_0002.pth"
    sets = [arg for override in resumed for arg in ("--set", override)]
    command = [sys.executable, "-m", "baton.flows.cli", "evaluate", str(checkpoint)]
    done = subprocess.run(
        [*command, "--config", str(config), *sets],
        cwd=ROOT,
        env=prefect_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    printed = dict(re.findall(r"^(val/\w+)\s+([\d.]+)$", done.stdout, re.MULTILINE))
    metrics = resumed_end["meta"]["metrics"]
    assert printed == {k: f"{metrics[k]:.4f}" for k in ("val/accuracy", "val/loss")}
