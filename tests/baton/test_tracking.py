"""The tracking package without a tracker: the operator's settings, the bounded sender
(a tracker that is slow or down never blocks training, a loss is counted), the run
tracker reading metrics.jsonl, and the curves."""

import json
import logging
import threading
import time
from pathlib import Path

import pytest

from baton.checkpoint import io
from baton.checkpoint.ref import CheckpointName
from baton.errors import UntrustedInputError
from baton.experiment import Experiment
from baton.tracking import RunIdentity, RunTracker, Sender, TrackingSettings, plot_history
from baton.tracking import curves as curves_module
from baton.tracking.items import FileCopy, Metric, Tag
from baton.tracking.tracker import flatten
from baton.trust.allowances import OperatorSettings


def settings_of(tmp_path, environ=None, table: str = "") -> TrackingSettings:
    (tmp_path / "pyproject.toml").write_text(table)
    environ = {"BATON_PROJECT_DIR": str(tmp_path), **(environ or {})}
    return TrackingSettings.of(OperatorSettings.read(environ))


def test_no_tracker_unless_the_operator_sets_one(tmp_path):
    assert not settings_of(tmp_path).enabled
    table = '[tool.baton.tracking]\nmlflow_tracking_uri = "http://mlflow:5000"\nqueue_size = 10\n'
    from_file = settings_of(tmp_path, table=table)
    assert (from_file.mlflow_tracking_uri, from_file.queue_size) == ("http://mlflow:5000", 10)
    # the worker's environment wins over the file
    env = {"BATON_MLFLOW_TRACKING_URI": "http://other:5000", "BATON_TRACKING_RETRY_S": "0.5"}
    from_env = settings_of(tmp_path, env, table)
    assert (from_env.mlflow_tracking_uri, from_env.retry_s) == ("http://other:5000", 0.5)


@pytest.mark.parametrize(
    ("environ", "table", "message"),
    [
        ({}, "[tool.baton.tracking]\nuri = 'x'\n", r"unknown key\(s\) \['uri'\]"),
        (
            {"BATON_TRACKING_QUEUE_SIZE": "many"},
            "",
            "BATON_TRACKING_QUEUE_SIZE='many' is not a int",
        ),
        ({"BATON_TRACKING_QUEUE_SIZE": "0"}, "", "queue_size 0 must be at least 1"),
        ({}, "[tool.baton.tracking]\nretry_s = 'soon'\n", "retry_s must be a float"),
        ({"BATON_MLFLOW_COPY_CHECKPOINTS": "maybe"}, "", "not a yes/no value"),
    ],
)
def test_bad_tracking_settings_are_refused_with_the_fix(tmp_path, environ, table, message):
    with pytest.raises(UntrustedInputError, match=message):
        settings_of(tmp_path, environ, table)


class RecordingSink:
    """A sink that takes batches, optionally failing, or blocking until released."""

    max_batch = 3

    def __init__(self, fail_opens=0, block: threading.Event | None = None):
        self.fail_opens = fail_opens
        self.block = block
        self.batches: list[list] = []
        self.closed: bool | None = None

    def open(self):
        if self.fail_opens:
            self.fail_opens -= 1
            raise ConnectionError("refused")

    def send(self, batch):
        if self.block is not None:
            self.block.wait()
        self.batches.append(list(batch))

    def close(self, finished):
        self.closed = finished


def metric(step: int) -> Metric:
    return Metric("loss", 1.0 / step, step, 0)


def test_the_sender_delivers_in_order_in_batches_after_failed_connections(caplog):
    sink = RecordingSink(fail_opens=2)
    sender = Sender(sink, max_items=100, retry_s=0.01)
    sender.start()
    sender.put([metric(s) for s in range(1, 8)])
    with caplog.at_level(logging.WARNING, logger="baton.tracking.sender"):
        report = sender.close(10, finished=True)
    assert [m.step for b in sink.batches for m in b] == list(range(1, 8))
    assert max(len(b) for b in sink.batches) == 3 and sink.closed is True
    assert (report.sent, report.lost, report.failures, report.connected) == (7, 0, 2, True)


def test_a_slow_tracker_never_blocks_training_and_what_it_missed_is_reported():
    release = threading.Event()
    sink = RecordingSink(block=release)
    sender = Sender(sink, max_items=5, retry_s=0.01, name="slow tracker")
    sender.start()
    started = time.monotonic()
    for step in range(1, 21):  # training goes on while the tracker hangs
        sender.put([metric(step)])
    assert time.monotonic() - started < 0.5
    report = sender.close(0.2, finished=True)
    release.set()
    # one batch of 3 was taken by the hung send; 5 waited; the rest did not fit
    assert report.dropped >= 12 and report.unsent >= 5 - 3
    assert report.lost == 20 - report.sent
    assert "LOST" in report.describe() and "queue full" in report.describe()


def test_a_tracker_that_is_down_loses_what_waited_and_says_so():
    sink = RecordingSink(fail_opens=10**6)
    sender = Sender(sink, max_items=100, retry_s=0.01)
    sender.start()
    sender.put([metric(s) for s in range(1, 4)])
    started = time.monotonic()
    report = sender.close(0.3, finished=True)
    assert time.monotonic() - started < 2
    assert (report.sent, report.unsent, report.connected) == (0, 3, False)
    assert "never reached" in report.describe() and "ConnectionError: refused" in report.describe()


def identity(experiment: Experiment, lineage: int = 1) -> RunIdentity:
    return RunIdentity(
        flow_run_id=None,
        flow_run_name="brave-fox",
        flow_run_url=None,
        experiment=experiment.name,
        experiment_dir=str(experiment.root),
        lineage=lineage,
        config_hash="c0ffee",
    )


def write_records(experiment: Experiment, records: list[dict]) -> None:
    for record in records:
        experiment.metrics.append(record.pop("kind"), record)


def test_the_tracker_sends_the_lineage_records_up_to_the_resume_point_then_what_is_new(tmp_path):
    experiment = Experiment(tmp_path, "exp")
    write_records(
        experiment,
        [
            {"kind": "iteration", "iter": 4, "train/loss": 0.9},
            {"kind": "epoch", "epoch": 1, "iter": 8, "train/loss": 0.8, "val/accuracy": 0.5},
            {"kind": "iteration", "iter": 12, "train/loss": 0.7},  # after the checkpoint
        ],
    )
    sink = RecordingSink()
    settings = TrackingSettings(mlflow_tracking_uri="http://unused", poll_s=0.01)
    tracker = RunTracker(
        experiment,
        identity(experiment),
        {"train": {"max_epochs": 2}},
        resume_epoch=1,
        resume_iter=8,
        lineage_started=0.0,
        settings=settings,
        sink=sink,
    )
    tracker.sender.start()
    with open(experiment.metrics.path, "a") as handle:
        handle.write('{"kind": "iteration", "iter": 16, "train/lo')  # being written
    report = tracker.close(finished=False, timeout_s=10)
    sent = [(m.key, m.step) for b in sink.batches for m in b if isinstance(m, Metric)]
    assert sent == [("running/train/loss", 4), ("train/loss", 1), ("val/accuracy", 1)]
    assert report.sent == 3 and sink.closed is False


def test_each_committed_checkpoint_is_one_reference_and_a_copy_only_when_asked(tmp_path):
    experiment = Experiment(tmp_path, "exp")
    store = experiment.store

    def commit(epoch: int):
        path = store.target(str(CheckpointName.for_epoch(epoch)))
        size, digest = io.save({"meta": {"epoch": epoch, "iter": 8 * epoch}}, str(path))
        return store.commit(str(path), epoch=epoch, iter=8 * epoch, size=size, sha256=digest)

    first = commit(1)
    sink = RecordingSink()
    tracker = RunTracker(
        experiment,
        identity(experiment),
        {},
        resume_epoch=1,
        resume_iter=8,
        lineage_started=0.0,
        settings=TrackingSettings(
            mlflow_tracking_uri="http://unused", mlflow_copy_checkpoints=True
        ),
        sink=sink,
    )
    tracker.sender.start()
    tracker.checkpoints_committed()
    second = commit(2)
    tracker.checkpoints_committed()
    tracker.checkpoints_committed()  # nothing new: nothing queued
    tracker.close(finished=True, timeout_s=5)
    items = [item for batch in sink.batches for item in batch]
    tags = {t.key: json.loads(t.value) for t in items if isinstance(t, Tag)}
    assert tags == {
        f"checkpoint/{Path(ref.uri).name}": {
            "uri": ref.uri,
            "sha256": ref.sha256,
            "size": ref.size,
            "epoch": ref.epoch,
            "iter": ref.iter,
        }
        for ref in (first, second)
    }
    assert [c.path for c in items if isinstance(c, FileCopy)] == [first.uri, second.uri]


def test_flatten_gives_dotted_keys_and_json_values():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x", "e": None, "f": {}}) == {
        "a.b": "1",
        "a.c": "[1, 2]",
        "d": "x",
        "e": "null",
        "f": "{}",
    }


HISTORY = [
    {"epoch": e, "iter": 8 * e, "train/loss": 1.0 / e, "val/accuracy": 0.2 * e, "train/lr": 0.1 / e}
    for e in (1, 2, 3)
]


def test_the_curves_are_a_png_with_a_panel_per_metric_kind():
    png = plot_history(HISTORY)
    assert png is not None and png.startswith(b"\x89PNG\r\n\x1a\n")
    assert plot_history([{"epoch": 1, "iter": 8, "other": 1.0}]) is None  # nothing to draw


def test_without_matplotlib_there_is_no_plot_and_one_log_line(monkeypatch, caplog):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    curves_module._pyplot.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    try:
        with caplog.at_level(logging.INFO, logger="baton.tracking.curves"):
            assert plot_history(HISTORY) is None
            assert plot_history(HISTORY) is None
    finally:
        monkeypatch.undo()
        curves_module._pyplot.cache_clear()
    assert [r.message for r in caplog.records].count(
        "matplotlib is not installed: no curves (pip install 'baton[plots]')"
    ) == 1


def test_a_full_queue_leaves_the_record_unread_and_drops_nothing():
    release = threading.Event()
    sink = RecordingSink(block=release)
    source = [metric(s) for s in range(1, 31)]
    asked: list[int] = []

    def collect(room: int) -> list:
        asked.append(room)
        taken = source[:room]
        del source[:room]
        return taken

    sender = Sender(sink, max_items=5, retry_s=0.01, collect=collect, poll_s=0.01)
    sender.start()
    time.sleep(0.1)  # the tracker hangs: the queue fills, the record waits
    assert max(asked) <= 5 and len(source) == 25
    release.set()
    report = sender.close(10, finished=True)
    assert [m.step for b in sink.batches for m in b] == list(range(1, 31))
    assert (report.sent, report.dropped, report.unsent) == (30, 0, 0)


def test_a_tracking_uri_without_mlflow_installed_tracks_nothing_and_says_so(
    tmp_path, monkeypatch, caplog
):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "mlflow" else real_find_spec(name, *a),
    )
    experiment = Experiment(tmp_path, "exp")
    settings = TrackingSettings(mlflow_tracking_uri="http://mlflow:5000")
    with caplog.at_level(logging.WARNING, logger="baton.tracking.tracker"):
        tracker = RunTracker.start(
            experiment, identity(experiment), {}, resume_epoch=0, resume_iter=0, settings=settings
        )
    assert tracker is None
    assert "mlflow is not installed" in caplog.text and "baton[mlflow]" in caplog.text
