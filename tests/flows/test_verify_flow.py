"""The verification flow on real Prefect: a verdict artifact, Completed when bitwise equal,
Failed (not retried) when B differs; the task validates B's config with another work_dir."""

import asyncio
import os

import pytest
from prefect.client.orchestration import get_client

from baton.checkpoint import io
from baton.config import load_config
from baton.experiment import Experiment
from baton.flows.verify import verify_checkpoints
from baton.run import pipeline as pl
from baton.tasks import verify_checkpoint
from baton.tasks._common import artifact_key

from .conftest import small_config


def trained(tmp_path, name):
    cfg = load_config(small_config(tmp_path / "wd", name=name, **{"train.max_epochs": 2}))
    pl.run(cfg)
    return Experiment.of(cfg)


@pytest.fixture
def operator_reads(monkeypatch, tmp_path):
    """The operator lets runs read the experiments under ``tmp_path/wd``."""
    monkeypatch.setenv(
        "BATON_CHECKPOINT_ROOTS",
        os.pathsep.join([os.environ.get("BATON_CHECKPOINT_ROOTS", ""), str(tmp_path / "wd")]),
    )


def artifact(key):
    async def read():
        async with get_client() as client:
            return await client.read_artifacts()

    found = [a for a in asyncio.run(read()) if a.key == key]
    return max(found, key=lambda a: a.created).data


def test_an_equal_pair_completes_with_its_verdict(prefect_harness, tmp_path, operator_reads):
    experiment = trained(tmp_path, "verify-flow")
    state = verify_checkpoints(str(experiment.root), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["equal"] and summary["b"]["uri"].endswith("epoch_0002.pth")
    markdown = artifact(artifact_key("verify-flow", "verification"))
    assert "Bitwise equal" in markdown and "epoch\\_0002\\.pth" in markdown


def test_a_pair_that_differs_fails_the_run(prefect_harness, tmp_path, operator_reads):
    experiment = trained(tmp_path, "verify-differs")
    b = experiment.store.latest()
    checkpoint = io.load(b.uri)
    checkpoint["optimizer"]["state"][0]["momentum_buffer"][0, 0] += 1.0
    size, digest = io.save(checkpoint, b.uri)
    experiment.store.commit(b.uri, epoch=b.epoch, iter=b.iter, size=size, sha256=digest)
    state = verify_checkpoints(str(experiment.root), return_state=True)
    assert state.is_failed()
    assert "optimizer.state.0.momentum_buffer: 1 of " in state.message
    markdown = artifact(artifact_key("verify-differs", "verification"))
    assert "Differs" in markdown and "`optimizer.state.0.momentum_buffer`" in markdown


def test_outside_the_operators_roots_is_refused(prefect_harness, tmp_path):
    experiment = trained(tmp_path, "verify-outside")
    state = verify_checkpoints(str(experiment.root), return_state=True)
    assert state.is_failed() and "outside every checkpoint root" in state.message


def test_the_task_validates_bs_config_with_another_work_dir(tmp_path, operator_reads):
    experiment = trained(tmp_path, "verify-moved")
    elsewhere = tmp_path / "deployment-folder"
    summary = verify_checkpoint.fn(str(experiment.root), work_dir=str(elsewhere))
    assert summary["equal"], summary["differences"]
    assert not elsewhere.exists()  # nothing written where the config was validated
