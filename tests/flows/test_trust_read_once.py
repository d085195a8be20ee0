"""The operator's trust is read once per run and passed down: a flow run (the steps its
tasks take), a plain-Python run and a CLI's validation each read pyproject.toml once, and
what the operator set there still holds (docs/security.md)."""

import pytest
from prefect.settings import PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW, temporary_settings

from baton import tasks
from baton.config import load_config, validate
from baton.errors import ConfigError
from baton.run import pipeline as pl
from baton.tasks.state import config_of, forget
from baton.trust import Quotas, Trust, allowances, deployment_environment

from ..baton.helpers import small_pipeline


@pytest.fixture
def reads(tmp_path, monkeypatch):
    """The project is an operator's, with quotas in its pyproject.toml; each read of that
    file is recorded."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text("[tool.baton.quotas]\nmax_workers = 3\n")
    monkeypatch.setenv("BATON_PROJECT_DIR", str(project))
    found = []
    read = allowances._pyproject_table

    def counted(folder):
        found.append(folder)
        return read(folder)

    monkeypatch.setattr(allowances, "_pyproject_table", counted)
    return found


def config(tmp_path, **overrides) -> dict:
    data = small_pipeline(tmp_path / "wd")
    data["train"] = {"max_epochs": 2}
    data.update(overrides)
    return data


def test_a_flow_run_reads_the_operators_settings_once(tmp_path, reads):
    # how train_pipeline and evaluate_checkpoint enter a run, then the run's tasks
    with (
        temporary_settings({PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW: "ignore"}),
        deployment_environment(None),
    ):
        cfg = tasks.validate_config.fn(config(tmp_path))
        plan = tasks.find_resume_point.fn(cfg)
        state = tasks.prepare.fn(cfg, plan)
        for epoch in (1, 2):
            state = tasks.train_epoch.fn(cfg, state, epoch)
            state = tasks.evaluate.fn(cfg, state, epoch)
            state = tasks.save_checkpoint.fn(cfg, state, epoch)
        forget(config_of(cfg))
    assert state.epoch == 2 and state.checkpoint is not None
    assert len(reads) == 1
    Trust.from_environment()  # outside a run, each call reads
    assert len(reads) == 2


def test_a_plain_run_reads_them_once_and_passes_them_down(tmp_path, reads):
    trust = Trust.from_environment()
    cfg = load_config(config(tmp_path), trust=trust)
    assert len(reads) == 1  # validation: the trust it was given, and its quotas
    pl.run(cfg, trust=trust)
    assert len(reads) == 1
    pl.run(cfg.model_copy(update={"experiment_name": "again"}))
    assert len(reads) == 2


def test_what_the_operator_set_still_holds_when_read_once(tmp_path, reads):
    """The quotas come from the same reading as the trust: pyproject.toml's still apply."""
    trust = Trust.from_environment()
    assert Quotas.of(trust).max_workers == 3 == Quotas.from_environment().max_workers
    train_data = {**config(tmp_path)["train_data"], "num_workers": 4}
    with pytest.raises(
        ConfigError, match=r"4 loader workers, more than the quota of 3 \(max_workers\)"
    ):
        validate(config(tmp_path, train_data=train_data))
    assert Quotas.of(Trust()).max_workers == 3  # a Trust made by hand reads the environment


def test_a_work_dir_swapped_for_a_link_between_two_tasks_is_refused(tmp_path, monkeypatch):
    """Each task checks the experiment's folder again where it takes the live pipeline: a
    folder replaced by a link out of the operator's roots after one task is refused by the
    next, which writes nothing there."""
    from baton.errors import UntrustedInputError

    from .conftest import small_config

    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    monkeypatch.setenv("BATON_WORK_DIR_ROOTS", str(allowed))
    config = small_config(allowed / "work")
    state = tasks.prepare.fn(config, tasks.find_resume_point.fn(config))
    try:
        state = tasks.train_epoch.fn(config, state, 1)
        (allowed / "work").rename(allowed / "moved")
        (allowed / "work").symlink_to(outside, target_is_directory=True)
        with pytest.raises(UntrustedInputError, match="work_dir"):
            tasks.train_epoch.fn(config, state, 2)
    finally:
        forget(config_of(config))
    assert list(outside.iterdir()) == []
