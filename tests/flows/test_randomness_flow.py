"""Through real Prefect: a pipeline whose data and model draw from the global generators
ends bitwise equal in two runs, while another thread draws from ``random`` throughout."""

import random
import threading

import pytest

from baton.flows.train import train_pipeline

from .conftest import small_config
from .helpers import assert_same_training_result, final_checkpoint

pytestmark = pytest.mark.integration

NOISY = {
    "model": {"type": "tests.baton.noisy.PingedMLP", "in_features": 8, "num_classes": 3},
    "train_data.dataset": {"type": "tests.baton.noisy.AugmentedSynthetic"},
    "train.max_epochs": 2,
}


def test_two_runs_end_equal_while_another_thread_draws_from_random(prefect_harness, tmp_path):
    quiet = small_config(tmp_path / "quiet", **NOISY)
    assert train_pipeline(config=quiet, return_state=True).is_completed()

    stop = threading.Event()

    def pings() -> None:  # what Prefect's websocket client does, only far more often
        while not stop.is_set():
            random.getrandbits(32)

    thread = threading.Thread(target=pings, daemon=True)
    thread.start()
    busy = small_config(tmp_path / "busy", **NOISY)
    try:
        assert train_pipeline(config=busy, return_state=True).is_completed()
    finally:
        stop.set()
        thread.join()
    assert_same_training_result(final_checkpoint(quiet), final_checkpoint(busy))
