"""Lineages on real Prefect: a retried fresh start continues the lineage it started."""

from pathlib import Path

import pytest

from baton.checkpoint.store import CheckpointStore
from baton.config import validate
from baton.flows.train import train_pipeline
from baton.run import pipeline as pl

from .conftest import small_config
from .helpers import assert_same_training_result, final_checkpoint, flaky
from .test_train_flow import reference

pytestmark = pytest.mark.integration


def test_a_flow_retry_of_a_fresh_start_continues_its_own_lineage(prefect_harness, tmp_path):
    earlier = small_config(tmp_path / "wd", **{"train.max_epochs": 2})
    _, kept = pl.run(validate(earlier))
    kept_bytes = Path(kept.uri).read_bytes()

    model = flaky(tmp_path, failures=3)  # fails inside epoch 2 more often than task retries
    cfg = small_config(tmp_path / "wd", model=model, resume="never")
    state = train_pipeline(config=cfg, return_state=True)
    assert state.is_completed()
    assert (tmp_path / "budget").read_text() == "3"  # the flow was retried once

    store = CheckpointStore(Path(cfg["work_dir"]) / cfg["experiment_name"])
    lineages = store.lineages()
    assert [lin.reason for lin in lineages] == ["first", "fresh"]  # the retry started none
    assert lineages[1].run is not None
    assert [r.epoch for r in lineages[1].checkpoints] == [1, 2, 3, 4]
    assert Path(kept.uri).read_bytes() == kept_bytes
    assert_same_training_result(reference(tmp_path, model), final_checkpoint(cfg))
