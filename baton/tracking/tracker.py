"""``RunTracker``: one flow run's values mirrored to the tracker of its lineage.

The experiment's ``metrics.jsonl`` is the run's record; the tracker follows it as it
grows (the sender's thread reads the lines appended since the last read), so the values
it sends are exactly the ones the record has, per epoch and per log interval:

* an ``epoch`` record: each metric under its own name (``train/loss``, ``val/accuracy``,
  ``train/lr``...) at step = the epoch;
* an ``iteration`` record (every ``train.log_interval`` iterations): each running metric
  as ``running/<name>`` at step = the global iteration.

When it starts, the tracker also reads what earlier runs of the lineage recorded up to
the position this run resumes from, so that values a killed run recorded but never sent
reach the tracker now (the sink sends only steps beyond the newest it holds). Each
committed checkpoint of the lineage becomes a tag ``checkpoint/<file>`` holding its
reference (path, sha256, size, epoch, iteration); the file itself is copied only when
the operator asks (``mlflow_copy_checkpoints``).
"""

import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baton.checkpoint.ref import CheckpointRef
from baton.experiment import Experiment
from baton.markdown import text
from baton.tracking.items import FileCopy, Metric, Tag
from baton.tracking.sender import Sender, SendReport
from baton.tracking.settings import TrackingSettings

logger = logging.getLogger(__name__)

# Keys of a metrics.jsonl record that are not metrics.
_NOT_METRICS = ("time", "kind", "epoch", "iter")
# The prefix of per-log-interval running metrics (their steps are iterations, not epochs).
RUNNING = "running/"


@dataclass(frozen=True)
class RunIdentity:
    """Who a tracked run is: the flow run, the experiment, its lineage, its config.

    Attributes:
        flow_run_id: The Prefect flow run's id (``None`` outside Prefect).
        flow_run_name: Its name; a lineage's tracker run is named after its first one.
        flow_run_url: Its page in the Prefect UI, when known.
        experiment: The experiment's name.
        experiment_dir: The experiment's folder.
        lineage: The lineage this run commits to.
        config_hash: The resolved config's hash.
    """

    flow_run_id: str | None
    flow_run_name: str
    flow_run_url: str | None
    experiment: str
    experiment_dir: str
    lineage: int
    config_hash: str

    @property
    def run_key(self) -> str:
        """The lineage's key in the tracker: the experiment's folder and the lineage."""
        text = f"{self.experiment_dir}\0L{self.lineage}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def tags(self) -> dict[str, str]:
        """The tags a tracker run carries (the flow run's, the newest that continued it)."""
        tags = {
            "baton.experiment": self.experiment,
            "baton.experiment_dir": self.experiment_dir,
            "baton.lineage": str(self.lineage),
            "baton.config_hash": self.config_hash,
        }
        if self.flow_run_id:
            tags["prefect.flow_run_id"] = self.flow_run_id
            tags["prefect.flow_run_name"] = self.flow_run_name
            # one tag per flow run that continued the lineage: the run's whole story
            tags[f"prefect.flow_runs/{self.flow_run_id}"] = self.flow_run_name
        if self.flow_run_url:
            tags["prefect.flow_run_url"] = self.flow_run_url
        return tags


class RunTracker:
    """Mirrors one run's metrics and checkpoints to its lineage's tracker run, from a
    background sender (see the module docstring); training never waits for it.

    Build it with :meth:`start`. Call :meth:`checkpoints_committed` after a checkpoint is
    committed and :meth:`close` at the end.

    Args:
        experiment: The experiment the run trains.
        identity: Who the run is.
        config: The resolved config (a nested mapping), logged as flattened params.
        resume_epoch: The epoch the run resumes from (0: a fresh start).
        resume_iter: The iteration it resumes from.
        lineage_started: When the lineage began (seconds since the epoch; 0 for the
            experiment's first): older records belong to other lineages.
        settings: The operator's tracking settings.
        sink: The tracker's client (default: MLflow's, from ``settings``).
    """

    def __init__(
        self,
        experiment: Experiment,
        identity: RunIdentity,
        config: dict[str, Any],
        *,
        resume_epoch: int,
        resume_iter: int,
        lineage_started: float,
        settings: TrackingSettings,
        sink: Any = None,
    ) -> None:
        if sink is None:
            from baton.tracking.mlflow_sink import MlflowSink

            sink = MlflowSink(
                settings.mlflow_tracking_uri,
                settings.mlflow_experiment,
                run_key=identity.run_key,
                run_name=identity.flow_run_name,
                tags=identity.tags(),
                params=flatten(config),
            )
        self.sink = sink
        self.identity = identity
        self._experiment = experiment
        self._settings = settings
        self._resume = (resume_epoch, resume_iter)
        self._lineage_started = lineage_started
        self._path = experiment.metrics.path
        self._start_offset = self._path.stat().st_size if self._path.exists() else 0
        self._offset = 0
        self._referenced: set[tuple[str, str]] = set()
        self._report: SendReport | None = None
        self.sender = Sender(
            sink,
            max_items=settings.queue_size,
            retry_s=settings.retry_s,
            collect=self._collect,
            poll_s=settings.poll_s,
            name=f"mlflow tracking of {identity.experiment} L{identity.lineage}",
        )

    @classmethod
    def start(
        cls,
        experiment: Experiment,
        identity: RunIdentity,
        config: dict[str, Any],
        *,
        resume_epoch: int,
        resume_iter: int,
        settings: TrackingSettings | None = None,
    ) -> "RunTracker | None":
        """Start tracking the run, or return ``None`` when the operator set no tracker."""
        settings = TrackingSettings.from_environment() if settings is None else settings
        if not settings.enabled:
            return None
        if importlib.util.find_spec("mlflow") is None:
            logger.warning(
                "a tracking URI is set but mlflow is not installed: nothing is tracked; "
                "install it on the worker (pip install 'baton[mlflow]') or unset "
                "BATON_MLFLOW_TRACKING_URI"
            )
            return None
        lineage = next((x for x in experiment.store.lineages() if x.id == identity.lineage), None)
        started = lineage.started if lineage is not None and identity.lineage > 1 else 0.0
        tracker = cls(
            experiment,
            identity,
            config,
            resume_epoch=resume_epoch,
            resume_iter=resume_iter,
            lineage_started=started,
            settings=settings,
        )
        tracker.checkpoints_committed()
        tracker.sender.start()
        return tracker

    @property
    def run_url(self) -> str | None:
        """The tracker run's page, once the tracker was reached."""
        return getattr(self.sink, "run_url", None)

    def checkpoints_committed(self) -> None:
        """Queue a reference to each checkpoint the lineage committed and the tracker has
        not seen (call it from the thread that commits, after a commit)."""
        lineage = next(
            (x for x in self._experiment.store.lineages() if x.id == self.identity.lineage), None
        )
        if lineage is None:
            return
        items: list[Any] = []
        for ref in lineage.checkpoints:
            if (ref.uri, ref.sha256) in self._referenced:
                continue
            self._referenced.add((ref.uri, ref.sha256))
            items.append(Tag(f"checkpoint/{Path(ref.uri).name}", _reference(ref)))
            if self._settings.mlflow_copy_checkpoints:
                items.append(FileCopy(ref.uri, "checkpoints"))
        self.sender.put(items)

    def close(self, *, finished: bool, timeout_s: float | None = None) -> SendReport:
        """Send what the record holds now and what waits, for at most ``timeout_s`` (the
        operator's ``close_timeout_s`` by default), then end the tracker run."""
        if self._report is None:
            self.checkpoints_committed()
            timeout = self._settings.close_timeout_s if timeout_s is None else timeout_s
            report = self.sender.close(timeout, finished=finished)
            if report.unsent:  # what the sender had not read yet is lost to the tracker too
                report = dataclasses.replace(report, unsent=report.unsent + self._unread())
            self._report = report
            level = logging.WARNING if report.lost else logging.INFO
            logger.log(level, "%s: %s", self.sender.name, report.describe())
        return self._report

    def summary_lines(self) -> list[str]:
        """Markdown lines for the run's summary: the tracker run's link and what was lost."""
        report = self._report or self.sender.report()
        url = self.run_url
        name = text(getattr(self.sink, "run_name", None) or self.identity.flow_run_name)
        where = f"[{name}]({url})" if url else f"{name} (no link: the tracker was not reached)"
        lines = [f"- MLflow run: {where}, {text(report.describe())}"]
        if report.lost:
            lines.append(
                f"- **{report.lost} tracked value(s) never reached MLflow**: "
                "the experiment folder holds them all (`metrics.jsonl`, the manifest)"
            )
        return lines

    # --- the sender's thread --------------------------------------------------------------

    def _collect(self, room: int) -> list[Any]:
        """The values of the metrics records appended since the last read, at most
        ``room`` of them (a record that does not fit is read next time), and, from the
        lines older than this run, the lineage's records up to the resume position."""
        if not self._path.exists():
            return []
        with open(self._path, "rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next read
        items: list[Any] = []
        for line in data[:end].splitlines(keepends=True):
            record = _record(line)
            found = _metrics_of(record)
            if self._offset < self._start_offset and not self._earlier_of_lineage(record):
                found = []
            if items and len(items) + len(found) > room:
                break
            items += found
            self._offset += len(line)
        return items

    def _unread(self) -> int:
        """Values in the metrics log beyond what the sender read (at the end of a run the
        tracker did not take everything)."""
        if not self._path.exists():
            return 0
        with open(self._path, "rb") as handle:
            handle.seek(self._offset)
            lines = handle.read().splitlines()
        return sum(len(_metrics_of(_record(line))) for line in lines)

    def _earlier_of_lineage(self, record: dict) -> bool:
        """Whether an older record belongs to this lineage at or before the resume point."""
        epoch, iteration = self._resume
        if (
            not isinstance(record.get("time"), (int, float))
            or record["time"] < self._lineage_started
        ):
            return False
        if record.get("kind") == "epoch":
            return isinstance(record.get("epoch"), int) and record["epoch"] <= epoch
        return isinstance(record.get("iter"), int) and record["iter"] <= iteration


def _record(line: bytes) -> dict:
    """One metrics.jsonl line as a record (``{}`` for a line a crash cut short)."""
    try:
        record = json.loads(line)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _metrics_of(record: dict) -> list[Metric]:
    """The tracker's values of one metrics.jsonl record."""
    kind = record.get("kind")
    if kind == "epoch":
        step, prefix = record.get("epoch"), ""
    elif kind == "iteration":
        step, prefix = record.get("iter"), RUNNING
    else:
        return []
    if not isinstance(step, int):
        return []
    stamp = int(float(record.get("time", 0.0)) * 1000)
    return [
        Metric(prefix + key, float(value), step, stamp)
        for key, value in record.items()
        if key not in _NOT_METRICS
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    ]


def _reference(ref: CheckpointRef) -> str:
    """A committed checkpoint as the tracker keeps it: where, which bytes, which position."""
    return json.dumps(
        {
            "uri": ref.uri,
            "sha256": ref.sha256,
            "size": ref.size,
            "epoch": ref.epoch,
            "iter": ref.iter,
        },
        sort_keys=True,
    )


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: dotted keys, values as JSON text (lists too)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return flat
