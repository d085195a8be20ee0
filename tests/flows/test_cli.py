"""The ``baton`` command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from baton.config import validate
from baton.errors import ConfigError
from baton.flows.cli import main
from baton.run import pipeline as pl

from .conftest import small_config

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path, cfg) -> str:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_validate_ok(tmp_path, capsys):
    path = write(tmp_path, small_config(tmp_path / "wd"))
    assert main(["validate", path]) == 0
    assert "valid" in capsys.readouterr().out
    assert not (tmp_path / "wd").exists()


def test_validate_bad_config_exits_2_and_lists_problems(tmp_path):
    cfg = small_config(tmp_path / "wd")
    cfg["train"]["max_epochs"] = -1
    cfg["model"]["type"] = "os.system"
    path = write(tmp_path, cfg)
    out = subprocess.run(
        [sys.executable, "-m", "baton.flows.cli", "validate", path],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 2
    assert (
        "2 problems" in out.stderr
        and "train.max_epochs" in out.stderr
        and "model.type" in out.stderr
    )


def test_run_with_bad_override_exits_2(tmp_path, capsys):
    path = write(tmp_path, small_config(tmp_path / "wd"))
    assert main(["run", path, "--set", "train.max_epochs=zero"]) == 2
    assert "train.max_epochs" in capsys.readouterr().err


def test_run_with_a_bad_training_process_setting_exits_2_before_any_run(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("BATON_TRAINING_PROCESS", "thread")
    path = write(tmp_path, small_config(tmp_path / "wd"))
    assert main(["run", path]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "BATON_TRAINING_PROCESS is 'thread': set it to" in err
    assert not (tmp_path / "wd").exists()  # nothing started, nothing written


def test_ckpt_list_and_inspect(tmp_path, capsys):
    cfg = small_config(tmp_path / "wd", **{"train.max_epochs": 2})
    _, ref = pl.run(validate(cfg))
    experiment = Path(cfg["work_dir"]) / cfg["experiment_name"]
    Path(ref.uri).write_bytes(b"garbage")  # damage the newest
    assert main(["ckpt", "list", str(experiment)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("ok") and "<- latest" in out[0]
    assert out[1].startswith("INVALID")
    assert main(["ckpt", "inspect", str(experiment / "checkpoints" / "epoch_0001.pth")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["meta"]["epoch"] == 1 and len(summary["sha256"]) == 64
    assert "state_dict" in summary["sections"]


def test_ckpt_inspect_refuses_an_unsafe_file(tmp_path, capsys):
    import os

    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    assert main(["ckpt", "inspect", str(path)]) == 1
    assert "refusing to load" in capsys.readouterr().err


@pytest.mark.integration
def test_evaluate(prefect_harness, tmp_path, capsys):
    cfg = small_config(tmp_path / "wd", **{"train.max_epochs": 2})
    _, ref = pl.run(validate(cfg))
    assert main(["evaluate", ref.uri, "--config", write(tmp_path, cfg)]) == 0
    out = capsys.readouterr().out
    assert f"val/accuracy     {ref.metrics['val/accuracy']:.4f}" in out


@pytest.mark.integration
def test_run_work_dir_is_relative_to_where_the_command_runs(prefect_harness, tmp_path, monkeypatch):
    # the project is elsewhere: a path typed on the command line still means "from here"
    project, here = tmp_path / "project", tmp_path / "here"
    project.mkdir()
    here.mkdir()
    monkeypatch.setenv("BATON_PROJECT_DIR", str(project))
    monkeypatch.chdir(here)
    path = write(tmp_path, small_config(tmp_path / "unused", **{"train.max_epochs": 1}))
    assert main(["run", path, "--work-dir", "out"]) == 0
    assert (here / "out" / "exp" / "checkpoints" / "epoch_0001.pth").is_file()
    assert not (project / "out").exists()


def test_ckpt_prune_deletes_what_the_policy_does_not_keep_and_dry_run_nothing(tmp_path, capsys):
    cfg = small_config(tmp_path / "wd", **{"train.max_epochs": 4})
    pl.run(validate(cfg))
    experiment = Path(cfg["work_dir"]) / cfg["experiment_name"]
    files = sorted(p.name for p in (experiment / "checkpoints").iterdir())
    assert len(files) == 4  # every checkpoint kept: keep_last null

    assert main(["ckpt", "prune", str(experiment), "--keep-last", "1", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2].rsplit("/", 1)[1] for line in lines[:-1]] == files[:3]
    assert "3 checkpoints would be deleted by keep_last=1" in lines[-1]
    assert sorted(p.name for p in (experiment / "checkpoints").iterdir()) == files

    assert main(["ckpt", "prune", str(experiment), "--keep-last", "2", "--lineage", "L1"]) == 0
    assert "2 checkpoints deleted" in capsys.readouterr().out
    assert sorted(p.name for p in (experiment / "checkpoints").iterdir()) == files[2:]
    assert main(["ckpt", "list", str(experiment)]) == 0
    assert capsys.readouterr().out.count("ok ") == 2
    assert main(["ckpt", "prune", str(experiment), "--keep-last", "1", "--lineage", "L7"]) == 1
    assert "no lineage L7" in capsys.readouterr().err
    # the runs' retention is unchanged: a run of the same config still keeps every file
    p, _ = pl.run(validate({**cfg, "train": {**cfg["train"], "max_epochs": 5}}))
    assert [r.epoch for r in p.strategy.checkpoints.list()] == [3, 4, 5]


def test_ckpt_retention_is_the_operators_way_to_change_what_runs_keep(tmp_path, capsys):
    cfg = small_config(tmp_path / "wd", **{"train.max_epochs": 2})
    pl.run(validate(cfg))
    experiment = Path(cfg["work_dir"]) / cfg["experiment_name"]
    assert main(["ckpt", "retention", str(experiment)]) == 0
    assert "retention keep_last=None" in capsys.readouterr().out
    shrunk = {**cfg, "train": {**cfg["train"], "max_epochs": 3}}
    shrunk["checkpoint"] = {**cfg["checkpoint"], "keep_last": 1}
    with pytest.raises(ConfigError, match="baton ckpt retention .* --keep-last 1"):
        pl.run(validate(shrunk))

    assert main(["ckpt", "retention", str(experiment), "--keep-last", "1"]) == 0
    assert "keep_last=None -> keep_last=1" in capsys.readouterr().out
    p, _ = pl.run(validate(shrunk))
    assert [r.epoch for r in p.strategy.checkpoints.list()] == [3]
    assert main(["ckpt", "retention", str(experiment), "--keep-last", "all"]) == 0
    assert "-> keep_last=None" in capsys.readouterr().out
    assert main(["ckpt", "retention", str(tmp_path / "nothing-here"), "--keep-last", "1"]) == 2
    assert not (tmp_path / "nothing-here").exists()
