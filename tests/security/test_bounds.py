"""Untrusted input is bounded in size, time and place: alias bombs, device files and
FIFOs, config paths outside configs/, and nothing echoed from files that are not configs."""

import os
import tracemalloc
from pathlib import Path

import pytest
import yaml

from baton import SingleDeviceStrategy
from baton.checkpoint import io
from baton.config import load_config
from baton.errors import CheckpointError, ConfigError
from baton.flows.cli import main
from baton.tasks.config import validate_config

from ..flows.conftest import small_config
from .payloads import alias_bomb, config_file

pytestmark = pytest.mark.timeout(60)


def test_an_alias_bomb_is_refused_quickly_in_little_memory():
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match="YAML aliases"):
            load_config(alias_bomb())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak} bytes to refuse a {len(alias_bomb())}-byte text"


def test_fewer_aliases_that_still_expand_hugely_are_refused():
    # 38 aliases, each level doubling: 20 * 2**14 * 10 values once expanded
    lines = ["a0: &a0 [" + ",".join(["x"] * 20) + "]"]
    for level in range(1, 15):
        lines.append(f"a{level}: &a{level} [" + ",".join([f"*a{level - 1}"] * 2) + "]")
    text = "\n".join(lines) + "\nbig: [" + ",".join(["*a14"] * 10) + "]\n"
    with pytest.raises(ConfigError, match="expands to more than|YAML aliases"):
        load_config(text)


def test_a_recursive_alias_is_refused():
    with pytest.raises(ConfigError, match="refers to itself|YAML aliases"):
        load_config("experiment_name: x\nmodel: &m [*m]\n")


@pytest.mark.parametrize("entry", ["validate", "run"])
def test_alias_bombs_through_the_cli(entry, tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    assert main([entry, str(path)]) == 2
    assert "YAML aliases" in capsys.readouterr().err


def test_alias_bomb_in_an_override(tmp_path, capsys):
    levels = ["a: &a [x,x,x,x,x,x,x,x,x]"]
    for level in "bcdefghi":
        previous = chr(ord(level) - 1)
        levels.append(f"{level}: &{level} [" + ",".join([f"*{previous}"] * 9) + "]")
    bomb = "{" + ", ".join(levels) + "}"
    assert main(["validate", str(config_file(tmp_path)), "--set", f"model.hidden={bomb}"]) == 2
    assert "YAML aliases" in capsys.readouterr().err


def test_deep_nesting_is_refused_as_a_config_error(tmp_path):
    # flow brackets (PyYAML's scanner is quadratic in their depth), an override too deep
    # for the composer's recursion, and an inline mapping from the UI
    deep_text = "experiment_name: x\nmodel: " + "[" * 400_000 + "]" * 400_000 + "\n"
    deep_mapping: dict = {}
    level = deep_mapping
    for _ in range(3000):
        level["a"] = {}
        level = level["a"]
    for source, overrides in (
        (deep_text, []),
        (small_config(tmp_path), ["model.hidden=" + "[" * 2000 + "]" * 2000]),
        (deep_mapping, []),
    ):
        with pytest.raises(ConfigError, match="nests deeper than 32 levels"):
            load_config(source, overrides)


def test_device_files_and_fifos_are_never_read(tmp_path, work_dir):
    cfg = small_config(work_dir, name="dev")
    experiment = Path(cfg["work_dir"]) / "dev" / "checkpoints"
    experiment.mkdir(parents=True)
    fifo = experiment / "waiting.pth"
    os.mkfifo(fifo)
    (experiment / "zero.pth").symlink_to("/dev/zero")
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(cfg, {"resume": str(fifo)})
    with pytest.raises(ConfigError, match="outside the experiment folder"):
        load_config(cfg, {"resume": str(experiment / "zero.pth")})
    for path in ("/dev/zero", str(fifo)):
        with pytest.raises(CheckpointError, match="not a checkpoint file"):
            io.sha256_of(path)
    strategy = SingleDeviceStrategy(work_dir=str(work_dir), experiment_name="dev")
    strategy.prepare({"type": "Linear", "in_features": 2, "out_features": 2})
    with pytest.raises(CheckpointError, match="device, FIFO or socket"):
        strategy.resume("/dev/zero")


def test_a_config_parameter_reads_only_configs(tmp_path, monkeypatch):
    secret = tmp_path / "secret.yaml"
    secret.write_text("password: hunter2\n")
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    (project / "configs" / "link.yaml").symlink_to(secret)
    (project / "configs" / "zero.yaml").symlink_to("/dev/zero")
    good = project / "configs" / "good.yaml"
    good.write_text(yaml.safe_dump(small_config(tmp_path / "wd", name="good")))
    monkeypatch.setenv("BATON_PROJECT_DIR", str(project))
    for value in (
        str(secret),
        "configs/link.yaml",
        "configs/../../secret.yaml",
        "/etc/passwd",
        "configs/zero.yaml",
    ):
        with pytest.raises(ConfigError) as err:
            validate_config.fn(value)
        assert "hunter2" not in str(err.value) and "root:" not in str(err.value), value
    assert validate_config.fn("configs/good.yaml")["experiment_name"] == "good"
    monkeypatch.setenv("BATON_CONFIG_ROOTS", str(tmp_path))
    with pytest.raises(ConfigError, match="password"):  # now a config, and not a valid one
        validate_config.fn(str(secret))


def test_pyproject_trust_table(tmp_path, monkeypatch, user_package):
    monkeypatch.setenv("BATON_PROJECT_DIR", str(tmp_path))
    cfg = small_config(tmp_path / "wd", name="mine")
    cfg["model"] = {"type": "mymodels.Net", "width": 3}
    with pytest.raises(ConfigError, match="outside the allowed modules"):
        load_config(cfg)
    (tmp_path / "pyproject.toml").write_text('[tool.baton]\nallowed_modules = ["mymodels"]\n')
    assert load_config(cfg).model["width"] == 3
    (tmp_path / "pyproject.toml").write_text('[tool.baton]\nallowed_module = ["mymodels"]\n')
    with pytest.raises(ConfigError, match="unknown key.*allowed_module"):
        load_config(cfg)
