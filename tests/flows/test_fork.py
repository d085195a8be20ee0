"""A changed config through the flow: refused with its keys, forked when asked, recorded."""

import pytest

from baton import ResumeConfigError
from baton.flows.cli import build_parser
from baton.flows.train import train_pipeline

from .conftest import small_config
from .helpers import final_checkpoint

pytestmark = pytest.mark.integration


def test_a_change_of_the_run_is_refused_and_the_fork_parameter_applies_it(
    prefect_harness, tmp_path
):
    first = small_config(tmp_path, **{"train.max_epochs": 2})
    assert train_pipeline(config=first, return_state=True).is_completed()

    changed = small_config(tmp_path, **{"optim_wrapper.optimizer.lr": 0.01})
    refused = train_pipeline(config=changed, return_state=True)
    assert refused.is_failed()
    with pytest.raises(ResumeConfigError, match=r"optim_wrapper.optimizer.lr: 0.05 -> 0.01"):
        refused.result()
    assert final_checkpoint(first)["meta"]["epoch"] == 2  # nothing was written

    forked = train_pipeline(config=changed, fork=True, return_state=True)
    assert forked.is_completed() and forked.result().epoch == 4
    meta = final_checkpoint(changed)["meta"]
    assert meta["config"]["optim_wrapper"]["optimizer"]["lr"] == 0.01
    assert meta["forks"][0]["from"] == "epoch_0002.pth"
    assert meta["forks"][0]["changes"][0]["key"] == "optim_wrapper.optimizer.lr"


def test_run_takes_a_fork_option():
    parser = build_parser()
    assert parser.parse_args(["run", "c.yaml", "--fork"]).fork is True
    assert parser.parse_args(["run", "c.yaml"]).fork is None  # the config's own setting
