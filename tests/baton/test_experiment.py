"""The Experiment owns its folder: one set of paths, one store with one retention policy."""

import pytest

from baton import ConfigError
from baton.config import load_config
from baton.experiment import Experiment
from baton.run import pipeline as pl
from baton.tasks.state import config_of

from .test_config import base
from .test_pipeline import cfg_for


def test_paths_are_joined_once_and_nothing_is_created(tmp_path):
    experiment = Experiment(tmp_path / "wd", "exp")
    root = tmp_path / "wd" / "exp"
    assert experiment.root == root
    assert experiment.metrics.path == root / "metrics.jsonl"
    assert experiment.restarts.path == root / "runs" / "restarts.json"
    assert experiment.flow_log_path("abc") == root / "runs" / "flow-abc.log"
    assert experiment.tensorboard_dir == root / "tensorboard"
    assert experiment.store.root == root and experiment.store.retention.keep_last is None
    assert not (tmp_path / "wd").exists()


def test_a_pipeline_strategy_is_given_the_experiments_store_once(tmp_path):
    cfg = cfg_for(tmp_path, "checkpoint.keep_last=2")
    p = pl.build_pipeline(cfg)
    store = p.strategy.checkpoints
    assert store is p.strategy.checkpoints is p.experiment.store
    assert store.retention == cfg.checkpoint.retention() and store.retention.keep_last == 2


def test_a_relative_work_dir_is_inside_the_project_wherever_the_process_runs(tmp_path, monkeypatch):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    monkeypatch.setenv("BATON_PROJECT_DIR", str(project))
    monkeypatch.chdir(elsewhere)
    cfg = load_config({**base(), "work_dir": "runs"})
    assert Experiment.of(cfg).root == project / "runs" / "base"


def test_a_task_config_that_is_not_json_is_validated_as_it_is(tmp_path):
    # no cache key for it: the schema's answer (a permanent ConfigError), not a TypeError
    raw = cfg_for(tmp_path).model_dump(mode="json")
    assert config_of(raw) == config_of(dict(raw))  # cached by content
    raw["work_dir"] = tmp_path / "wd"
    with pytest.raises(ConfigError, match="work_dir"):
        config_of(raw)
