"""MLflow tracking against a real ``mlflow server`` (sqlite, 127.0.0.1): a flow run is
one MLflow run of its lineage, read back through MLflow's client; a rerun after a SIGKILL
continues it with no duplicated and no missing step; a tracker that is down never stops
training, and the loss is reported."""

import asyncio
import json
import socket
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client

from baton.checkpoint.store import CheckpointStore
from baton.config import validate
from baton.flows.train import train_pipeline
from baton.tasks._common import artifact_key

from ..mlflow_server import closed_port_uri, mlflow_server
from .conftest import small_config
from .helpers import finish, flaky, kill_when, run_env, start, stop_group

mlflow = pytest.importorskip("mlflow")
pytestmark = [pytest.mark.integration, pytest.mark.slow]

EPOCHS, EPOCH_LENGTH, LOG_INTERVAL = 4, 8, 4
EPOCH_KEYS = {"train/loss", "train/accuracy", "train/lr", "val/loss", "val/accuracy"}


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.fixture
def tracked(monkeypatch, tracking_uri):
    """The operator's settings: this server, short retries and close timeouts."""
    monkeypatch.setenv("BATON_MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.setenv("BATON_MLFLOW_EXPERIMENT", "baton-tests")
    monkeypatch.setenv("BATON_TRACKING_RETRY_S", "0.2")
    monkeypatch.setenv("BATON_TRACKING_CLOSE_TIMEOUT_S", "30")
    return tracking_uri


def runs_of(uri: str, experiment: str) -> list:
    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name("baton-tests")
    if found is None:
        return []
    return client.search_runs(
        [found.experiment_id], filter_string=f"tags.`baton.experiment` = '{experiment}'"
    )


def steps(uri: str, run_id: str, key: str) -> list[int]:
    history = mlflow.MlflowClient(uri).get_metric_history(run_id, key)
    return sorted(m.step for m in history)


def read_artifacts():
    async def read():
        async with get_client() as client:
            return await client.read_artifacts()

    return asyncio.run(read())


def flow_run_name(run_id) -> str:
    async def read():
        async with get_client() as client:
            return (await client.read_flow_run(run_id)).name

    return asyncio.run(read())


def test_a_flow_run_is_one_mlflow_run_of_its_lineage(prefect_harness, tracked, tmp_path):
    # a flaky model: the training task fails three times, more than its two retries, and
    # the flow's retry goes on: the task's retries and the flow's continue the same run
    model = flaky(tmp_path, failures=3)
    cfg = small_config(
        tmp_path / "wd", name="tracked", model=model, **{"train.log_interval": LOG_INTERVAL}
    )
    state = train_pipeline(config=cfg, return_state=True)
    assert state.is_completed(), state.message
    assert (tmp_path / "budget").read_text() == "3"
    [run] = runs_of(tracked, "tracked")
    flow_run_id = str(state.state_details.flow_run_id)
    assert run.info.run_name == flow_run_name(flow_run_id)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["prefect.flow_run_id"] == flow_run_id
    assert tags["prefect.flow_run_url"].endswith(f"/flow-run/{flow_run_id}")
    assert tags["baton.lineage"] == "1"
    assert tags["baton.config_hash"] == validate(cfg).config_hash
    # params: the resolved config, flattened
    params = run.data.params
    assert params["train.max_epochs"] == str(EPOCHS)
    assert params["optim_wrapper.optimizer.lr"] == "0.05"
    assert params["experiment_name"] == "tracked"
    # per epoch (step = epoch) and per log interval (step = iteration), each step once
    for key in EPOCH_KEYS:
        assert steps(tracked, run.info.run_id, key) == list(range(1, EPOCHS + 1)), key
    running = steps(tracked, run.info.run_id, "running/train/loss")
    assert running == list(range(LOG_INTERVAL, EPOCHS * EPOCH_LENGTH + 1, LOG_INTERVAL))
    # the learning rate follows the schedule (StepLR: halved every 2 epochs)
    lrs = [
        m.value
        for m in mlflow.MlflowClient(tracked).get_metric_history(run.info.run_id, "train/lr")
    ]
    assert sorted(lrs, reverse=True) == pytest.approx([0.05, 0.05, 0.025, 0.025])
    # every committed checkpoint, as a reference (no copy)
    store = CheckpointStore(Path(cfg["work_dir"]) / "tracked")
    for ref in store.list():
        reference = json.loads(tags[f"checkpoint/{Path(ref.uri).name}"])
        assert reference == {
            "uri": ref.uri,
            "sha256": ref.sha256,
            "size": ref.size,
            "epoch": ref.epoch,
            "iter": ref.iter,
        }
    assert mlflow.MlflowClient(tracked).list_artifacts(run.info.run_id) == []
    # the summary links to the MLflow run and carries the curves
    summary = max(
        (a for a in read_artifacts() if a.key == artifact_key("tracked", "summary")),
        key=lambda a: a.created,
    )
    assert f"/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in summary.data
    assert "](data:image/png;base64," in summary.data
    assert "LOST" not in summary.data


def test_a_rerun_after_sigkill_continues_the_same_run_without_duplicate_or_missing_steps(
    tracked, tmp_path
):
    env = {**run_env(tmp_path / "prefect_home"), "BATON_MLFLOW_TRACKING_URI": tracked}
    env.update(
        BATON_MLFLOW_EXPERIMENT="baton-tests",
        BATON_TRACKING_RETRY_S="0.2",
        BATON_TRACKING_POLL_S="0.1",
    )
    model = {
        "type": "tests.faults.SlowMLP",
        "in_features": 8,
        "num_classes": 3,
        "hidden": [16],
        "dropout": 0.2,
        "delay": 0.1,
    }
    cfg = small_config(tmp_path / "wd", name="killed", model=model, **{"train.log_interval": 2})
    store = CheckpointStore(Path(cfg["work_dir"]) / "killed")

    def sent_beyond_a_checkpoint():
        newest = store.latest() if store.manifest_path.exists() else None
        found = runs_of(tracked, "killed") if newest is not None else []
        sent = steps(tracked, found[0].info.run_id, "running/train/loss") if found else []
        return bool(sent) and sent[-1] > newest.iter + 2

    process = start(cfg, env, tmp_path)
    try:
        # killed once MLflow took values beyond the newest checkpoint
        kill_when(sent_beyond_a_checkpoint, process)
    finally:
        stop_group(process)
    [killed] = runs_of(tracked, "killed")
    assert killed.info.status == "RUNNING"  # nobody ended it
    newest = store.latest()
    assert newest is not None and newest.iter < EPOCHS * EPOCH_LENGTH
    before = steps(tracked, killed.info.run_id, "running/train/loss")
    assert before[-1] > newest.iter, "the kill should leave values sent beyond the checkpoint"
    finish(cfg, env, tmp_path)

    [run] = runs_of(tracked, "killed")
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["prefect.flow_run_id"] != killed.data.tags["prefect.flow_run_id"]
    flow_runs = {k for k in run.data.tags if k.startswith("prefect.flow_runs/")}
    assert flow_runs == {
        f"prefect.flow_runs/{run.data.tags['prefect.flow_run_id']}",
        f"prefect.flow_runs/{killed.data.tags['prefect.flow_run_id']}",
    }
    assert run.info.run_name == killed.info.run_name  # the lineage's first flow run
    for key in EPOCH_KEYS:
        assert steps(tracked, run.info.run_id, key) == list(range(1, EPOCHS + 1)), key
    assert steps(tracked, run.info.run_id, "running/train/loss") == list(
        range(2, EPOCHS * EPOCH_LENGTH + 1, 2)
    )
    # the values the killed run sent beyond the checkpoint are the rerun's (exact resume)
    records = [
        json.loads(line)
        for line in (Path(cfg["work_dir"]) / "killed" / "metrics.jsonl").read_text().splitlines()
    ]
    last = {r["iter"]: r["train/loss"] for r in records if r["kind"] == "iteration"}
    history = mlflow.MlflowClient(tracked).get_metric_history(run.info.run_id, "running/train/loss")
    assert {m.step: m.value for m in history} == pytest.approx(last)


def test_checkpoint_files_are_copied_only_when_the_operator_asks(
    prefect_harness, tracked, monkeypatch, tmp_path
):
    monkeypatch.setenv("BATON_MLFLOW_COPY_CHECKPOINTS", "1")
    cfg = small_config(tmp_path / "wd", name="copied", **{"train.max_epochs": 2})
    assert train_pipeline(config=cfg, return_state=True).is_completed()
    [run] = runs_of(tracked, "copied")
    copies = mlflow.MlflowClient(tracked).list_artifacts(run.info.run_id, "checkpoints")
    refs = CheckpointStore(Path(cfg["work_dir"]) / "copied").list()
    assert {(Path(a.path).name, a.file_size) for a in copies} == {
        (Path(r.uri).name, r.size) for r in refs
    }


@pytest.fixture
def silent_server():
    """A tracking URI whose server accepts connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)  # connections wait in the backlog: requests hang until their timeout
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("tracker", ["down", "silent"])
def test_a_tracker_that_is_down_or_silent_never_stops_training_and_the_loss_is_reported(
    prefect_harness, monkeypatch, tmp_path, request, tracker
):
    uri = closed_port_uri() if tracker == "down" else request.getfixturevalue("silent_server")
    monkeypatch.setenv("BATON_MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("BATON_TRACKING_RETRY_S", "0.1")
    monkeypatch.setenv("BATON_TRACKING_CLOSE_TIMEOUT_S", "1")
    name = f"untracked-{tracker}"
    cfg = small_config(tmp_path / "wd", name=name, **{"train.max_epochs": 2})
    started = time.monotonic()
    state = train_pipeline(config=cfg, return_state=True)
    assert state.is_completed(), state.message
    assert state.result().epoch == 2
    # the end waits at most the close timeout for the tracker (MLflow's HTTP timeout is 10 s)
    assert time.monotonic() - started < 30
    summary = max(
        (a for a in read_artifacts() if a.key == artifact_key(name, "summary")),
        key=lambda a: a.created,
    )
    assert "never reached MLflow" in summary.data
    assert "LOST" in summary.data and "the tracker was never reached" in summary.data
    assert "](data:image/png;base64," in summary.data  # the curves need no tracker
