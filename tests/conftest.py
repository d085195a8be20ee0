"""Shared fixtures: tiny models, deterministic strategies, isolated work dirs."""

import os

# Flows train in a process forked from the test's (baton.run.own_process), which is safe
# only while this process has no OpenMP workers: one torch thread, here and in every
# process the suite starts (a `baton run`, a worker's flow run), so that all of them
# compute the same bits as the references computed here (a matrix product on two threads
# may sum in another order). Set before torch is imported: it reads it then.
os.environ["OMP_NUM_THREADS"] = "1"

import tempfile

import pytest
import torch
from torch import nn

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The suite plays the operator: it trusts its own fixtures (components in tests/, work
# dirs under the temporary folder). Child processes inherit these.
os.environ.setdefault("BATON_ALLOWED_MODULES", "tests")
os.environ.setdefault("BATON_WORK_DIR_ROOTS", os.path.realpath(tempfile.gettempdir()))
os.environ.setdefault("BATON_DATA_ROOTS", os.path.realpath(tempfile.gettempdir()))
torch.set_num_threads(1)  # in case torch was imported first


@pytest.fixture
def work_dir(tmp_path):
    """A fresh work dir for strategies."""
    return tmp_path / "work_dirs"


@pytest.fixture(autouse=True)
def _restore_trust():
    """`baton run` trusts what its command line names by extending BATON_* variables of
    its own process; in-process CLI calls must not leak that into later tests."""
    before = {k: v for k, v in os.environ.items() if k.startswith("BATON_")}
    yield
    for key in [k for k in os.environ if k.startswith("BATON_")]:
        if key not in before:
            del os.environ[key]
    os.environ.update(before)


@pytest.fixture(autouse=True)
def _restore_torch_determinism():
    """Strategies may switch on deterministic algorithms; tests must not leak that."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


class TinyNet(nn.Module):
    """Two linear layers with dropout, so the torch RNG matters during training."""

    def __init__(self, in_features: int = 8, hidden: int = 16, out: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A user's own package ``mymodels`` with a model ``Net(width)``: importable, and not
    trusted until an operator allows it. Returns the folder that holds it."""
    package = tmp_path / "mymodels"
    package.mkdir()
    (package / "__init__.py").write_text(
        "import torch\nclass Net(torch.nn.Linear):\n"
        "    def __init__(self, width: int):\n        super().__init__(8, width)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """Real Prefect for flow tests: one test harness per session (every package's tests
    share it), isolated storage, no heartbeats."""
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
