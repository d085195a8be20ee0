"""Real Prefect for flow tests: one test harness per session, isolated storage, no heartbeats."""

import pytest

from baton.config import load_config


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    from prefect.settings import (
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    settings = {
        PREFECT_RESULTS_LOCAL_STORAGE_PATH: str(tmp_path_factory.mktemp("results")),
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
        PREFECT_SERVER_ANALYTICS_ENABLED: False,
        PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW: "ignore",
    }
    with temporary_settings(settings), prefect_test_harness(server_startup_timeout=120):
        yield


def small_config(work_dir, name="exp", model=None, **overrides) -> dict:
    """A tiny pipeline on synthetic data (8 iterations per epoch), as a resolved dict."""
    data = {
        "experiment_name": name,
        "work_dir": str(work_dir),
        "randomness": {"seed": 3, "deterministic": True},
        "model": model
        or {"type": "MLP", "in_features": 8, "num_classes": 3, "hidden": [16], "dropout": 0.2},
        "train_data": {"dataset": {"type": "SyntheticClassification"}, "batch_size": 32},
        "val_data": {
            "dataset": {"type": "SyntheticClassification", "seed": 1},
            "batch_size": 64,
            "shuffle": False,
        },
        "optim_wrapper": {"optimizer": {"type": "SGD", "lr": 0.05, "momentum": 0.9}},
        "param_scheduler": [{"type": "StepLR", "step_size": 2, "gamma": 0.5}],
        "train": {"max_epochs": 4},
        "checkpoint": {"keep_last": None},
    }
    return load_config(data, overrides).model_dump(mode="json")
