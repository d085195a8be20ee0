"""Real Prefect for flow tests: one test harness per session, isolated storage, no heartbeats."""

import pytest

from baton.config import load_config

from ..baton.helpers import small_pipeline


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
    return load_config(small_pipeline(work_dir, name, model), overrides).model_dump(mode="json")
