"""A flow run's artifacts on real Prefect: a handful of cards, the summary first as the UI
orders them, each updated in place; nothing lost while the API is unreachable."""

import contextlib
import json
import logging
import socket
import time

import pytest
from prefect import flow, get_client
from prefect.client.schemas.filters import (
    ArtifactCollectionFilter,
    ArtifactCollectionFilterKey,
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    ArtifactFilterType,
)
from prefect.client.schemas.sorting import ArtifactSort
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL, temporary_settings

from baton.checkpoint.ref import CheckpointRef
from baton.flows.train import train_pipeline
from baton.tasks import report
from baton.tasks._common import artifact_key
from baton.tasks.report import EpochReporter
from baton.tasks.state import RunState

from .conftest import small_config
from .helpers import flaky

pytestmark = pytest.mark.integration

KINDS = ("summary", "metrics", "checkpoint")


def cards_of(flow_run_id) -> list:
    """The run's artifacts as the UI lists them: its request (results left out,
    ``sort: ID_DESC``) on the run's Artifacts tab."""
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
                type=ArtifactFilterType(not_any_=["result"]),
            ),
            sort=ArtifactSort.ID_DESC,
        )


def by_kind(name: str, cards: list) -> dict:
    """The run's cards by kind; fails unless there is exactly one of each."""
    kind_of = {artifact_key(name, kind): kind for kind in KINDS}
    kinds = [kind_of.get(c.key, c.type if c.key is None else c.key) for c in cards]
    assert sorted(kinds) == sorted([*KINDS, "progress"]), kinds
    return dict(zip(kinds, cards, strict=True))


def assert_record(name: str, flow_run_id, epochs: int, newest: str) -> dict:
    """The run shows four cards, one version each, the summary first and described; the
    progress is 100, the table holds every epoch, the link names the newest checkpoint."""
    cards = cards_of(flow_run_id)
    card = by_kind(name, cards)
    assert cards[0].id == card["summary"].id, [c.key for c in cards]
    # The v1 UI lists the flow run's own artifacts before its task runs'.
    assert all(c.task_run_id is None for c in cards)
    assert card["summary"].description
    assert card["progress"].data == 100
    assert [r["epoch"] for r in json.loads(card["metrics"].data)] == list(range(1, epochs + 1))
    assert newest in card["checkpoint"].data
    keys = [artifact_key(name, kind) for kind in KINDS]
    with get_client(sync_client=True) as client:
        versions = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys))
        )
        latest = client.read_latest_artifacts(
            artifact_filter=ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(any_=keys))
        )
    assert sorted(v.id for v in versions) == sorted(card[k].id for k in KINDS)
    # the Artifacts page's latest version of each key is this run's card, as updated
    assert {a.latest_id: a.data for a in latest} == {card[k].id: card[k].data for k in KINDS}
    return card


def test_a_run_shows_one_card_of_each_kind_updated_in_place(prefect_harness, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "ARTIFACT_MIN_INTERVAL_S", 0.0)  # publish after every epoch
    cfg = small_config(tmp_path / "wd", name="record-cards")
    state = train_pipeline(config=cfg, return_state=True)
    assert state.is_completed()
    card = assert_record("record-cards", state.state_details.flow_run_id, 4, "epoch_0004.pth")
    summary = card["summary"]
    assert "summary at epoch 4/4 (training complete)" in summary.description
    assert "## Checkpoints" in summary.data and "Training from epoch" not in summary.data


def test_a_flow_retry_updates_the_cards_of_its_first_attempt(prefect_harness, tmp_path):
    model = flaky(tmp_path, failures=3)  # more than the task's two retries: the flow retries
    cfg = small_config(tmp_path / "wd", name="record-retried", model=model)
    state = train_pipeline(config=cfg, return_state=True)
    assert state.is_completed()
    card = assert_record("record-retried", state.state_details.flow_run_id, 4, "epoch_0004.pth")
    assert "training complete" in card["summary"].description


# Outages: the reporter's API is made unreachable (its URL: a port nobody listens on)
# around real publishes inside a real flow run, then the harness's URL again.


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == level]


@pytest.fixture
def run_log():
    handler = Records()
    logger = logging.getLogger("prefect.flow_runs")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@pytest.fixture
def down_url():
    """An API URL that refuses connections: a port bound here, never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/api"


def wait_until(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"never {what}"
        time.sleep(0.02)


def states(name: str, epochs: int, folder: str) -> list[RunState]:
    """A run's states from epoch 0 to ``epochs``, each with a checkpoint of its epoch."""

    def at(epoch: int) -> RunState:
        checkpoint = CheckpointRef(
            uri=f"{folder}/epoch_{epoch:04d}.pth",
            epoch=epoch,
            iter=8 * epoch,
            size=1,
            sha256=f"{epoch:064x}",
        )
        return RunState(
            experiment_name=name,
            checkpoint=checkpoint if epoch else None,
            epoch=epoch,
            iter=8 * epoch,
            max_epochs=epochs,
            max_iters=8 * epochs,
            epoch_length=8,
            metrics={"train/loss": 1.0 / (epoch + 1)},
        )

    return [at(e) for e in range(epochs + 1)]


def table_epochs(name: str) -> list[int]:
    """The epochs in this flow run's metrics table, as the server has it now."""
    key = artifact_key(name, "metrics")
    card = next((c for c in cards_of(flow_run.get_id()) if c.key == key), None)
    return [r["epoch"] for r in json.loads(card.data)] if card else []


@contextlib.contextmanager
def api_down(reporter: EpochReporter, url: str):
    """The reporter's API is unreachable for the calls inside; it has failed once at exit."""
    with temporary_settings({PREFECT_API_URL: url}):
        yield
        wait_until(lambda: reporter.publish_failed, "failed to publish")


@flow(persist_result=False)
def outage_at_the_end(cfg: dict, down_url: str, close_timeout_s: float) -> None:
    """Epoch 1 published; epochs 2-4 and the full summary while the API is down; close()
    once it is back."""
    run = states(cfg["experiment_name"], 4, report_folder(cfg))
    reporter = EpochReporter(cfg, close_timeout_s=close_timeout_s)
    reporter.start(run[0])
    reporter.report(run[1])
    wait_until(lambda: table_epochs(run[0].experiment_name) == [1], "published epoch 1")
    with api_down(reporter, down_url):
        for state in run[2:]:
            reporter.report(state)
        reporter.finish(run[4], "# the full summary")
    reporter.close()


@flow(persist_result=False)
def outage_then_republish(cfg: dict, down_url: str) -> None:
    """Epoch 2 reported while the API is down; republish() once it is back, then close()."""
    run = states(cfg["experiment_name"], 4, report_folder(cfg))
    reporter = EpochReporter(cfg)
    reporter.start(run[0])
    reporter.report(run[1])
    wait_until(lambda: table_epochs(run[0].experiment_name) == [1], "published epoch 1")
    with api_down(reporter, down_url):
        reporter.report(run[2])
    reporter.republish()
    wait_until(lambda: not reporter.publish_failed, "republished")  # set after the pass
    assert table_epochs(run[0].experiment_name) == [1, 2]
    reporter.close()


@flow(persist_result=False)
def outage_past_close(cfg: dict, down_url: str) -> None:
    """The API stays down through close(), which gives up after its bound."""
    run = states(cfg["experiment_name"], 4, report_folder(cfg))
    reporter = EpochReporter(cfg, close_timeout_s=0.5)
    reporter.start(run[0])
    with temporary_settings({PREFECT_API_URL: down_url}):
        reporter.report(run[1])
        wait_until(lambda: reporter.publish_failed, "failed to publish")
        reporter.close()


def report_folder(cfg: dict) -> str:
    return f"{cfg['work_dir']}/{cfg['experiment_name']}/checkpoints"


@pytest.fixture
def publish_every_epoch(monkeypatch):
    monkeypatch.setattr(report, "ARTIFACT_MIN_INTERVAL_S", 0.0)


def test_artifacts_reported_while_the_api_is_down_arrive_when_it_is_back(
    prefect_harness, tmp_path, down_url, run_log, publish_every_epoch
):
    cfg = small_config(tmp_path / "wd", name="record-outage")
    state = outage_at_the_end(cfg, down_url, 60.0, return_state=True)
    assert state.is_completed()
    card = assert_record("record-outage", state.state_details.flow_run_id, 4, "epoch_0004.pth")
    assert card["summary"].data == "# the full summary"
    warnings = run_log.messages(logging.WARNING)
    assert len(warnings) == 1 and "will be retried" in warnings[0], warnings
    infos = [m for m in run_log.messages(logging.INFO) if "after the API came back" in m]
    assert len(infos) == 1 and "epoch 4" in infos[0], infos
    assert not [r for r in run_log.records if r.levelno >= logging.ERROR]


def test_republish_sends_the_newest_artifacts_as_soon_as_the_api_is_back(
    prefect_harness, tmp_path, down_url, run_log, publish_every_epoch
):
    cfg = small_config(tmp_path / "wd", name="record-republish")
    state = outage_then_republish(cfg, down_url, return_state=True)
    assert state.is_completed()
    infos = [m for m in run_log.messages(logging.INFO) if "after the API came back" in m]
    assert len(infos) == 1 and "epoch 2" in infos[0], infos


def test_close_gives_up_after_its_bound_and_says_so(
    prefect_harness, tmp_path, down_url, run_log, publish_every_epoch
):
    cfg = small_config(tmp_path / "wd", name="record-gave-up")
    state = outage_past_close(cfg, down_url, return_state=True)
    assert state.is_completed()
    warnings = run_log.messages(logging.WARNING)
    assert len(warnings) == 2, warnings
    assert "will be retried" in warnings[0]
    assert "gave up publishing the artifacts of epoch 1" in warnings[1]
    assert "metrics.jsonl and the checkpoints hold the full record" in warnings[1]
    assert not [r for r in run_log.records if r.levelno >= logging.ERROR]
