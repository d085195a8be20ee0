"""Reporting: per-epoch metrics (metrics.jsonl, TensorBoard, MLflow when the operator set
a tracking URI) and the flow run's artifacts (summary, progress, metrics table, newest
checkpoint), kept up to date in place by the flow between its tasks, and the run summary
task (with the curves)."""

import base64
import contextlib
import contextvars
import dataclasses
import functools
import json
import logging
import math
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any
from uuid import UUID

import prefect.context
from prefect import get_client, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import ArtifactCreate, ArtifactUpdate
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.context import FlowRunContext, TaskRunContext
from prefect.exceptions import PrefectHTTPStatusError
from prefect.runtime import flow_run
from prefect.settings import PREFECT_CLIENT_MAX_RETRIES

from baton.checkpoint import io
from baton.experiment import Experiment
from baton.experiment.metrics import history_table
from baton.markdown import code_block, inline_code, text
from baton.tasks._common import artifact_key, run_logger
from baton.tasks.state import RunState, config_of
from baton.tracking import RunIdentity, RunTracker, plot_history

SPARK = "▁▂▃▄▅▆▇█"


@functools.cache
def _summary_writer_class():
    """TensorBoard's SummaryWriter, or None without the optional extra (looked up once:
    a failing import costs ~50 ms each time it is tried)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


def sparkline(values: list[float]) -> str:
    """A unicode sparkline of a series (the Prefect UI renders it in markdown)."""
    if not values:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - low) / span * len(SPARK)))] for v in values)


# Per-epoch reporting is plain code the flow runs between its tasks, not tasks: each
# task run costs the server ~25-35 ms of CPU (it records the run's events and states),
# which on a small machine competes with training; reporting needs no retries and no
# state of its own. Its artifacts belong to the flow run.

# Artifacts are API calls (~30 ms each here): with short epochs, publish at most this
# often (the first time this long after the run starts), and always after the last
# epoch. metrics.jsonl and TensorBoard get every epoch regardless.
ARTIFACT_MIN_INTERVAL_S = 5.0
# How long close() waits for the last artifacts when the API is unreachable, retrying
# every CLOSE_RETRY_INTERVAL_S: a server restart (an upgrade) takes well under a minute.
CLOSE_TIMEOUT_S = 60.0
CLOSE_RETRY_INTERVAL_S = 1.0
# One API request's timeout: a server that accepts connections but does not answer
# must not hold the newest artifacts back for Prefect's default 60 s per attempt.
REQUEST_TIMEOUT_S = 10.0
# Retries of one request inside a pass (backing off 2, then 4 s): enough for a server
# whose database was busy, short enough that a stopping run's last pass ends in time.
PASS_RETRIES = 2

# The Prefect UI lists a run's artifacts by id, largest first: both UIs ask the server
# for `sort: ID_DESC` (v2's flow run page; v1 sends no sort and gets the server's
# default, ID_DESC), and v1 lists the flow run's own artifacts before its task runs'.
# The server draws ids at random (uuid4), so creation order decides nothing: a card is
# created again (and its first version deleted) until its id sorts right. The summary
# takes an id in the top half (2 tries on average), so that each other card needs 1.4
# on average to take an id below it (about 9 calls a run in all, ~10 ms each here).
_SUMMARY_ID_FLOOR = 1 << 127
_MAX_CREATE_TRIES = 32  # a bound for a server that would stop drawing ids at random


@dataclasses.dataclass(frozen=True)
class _Card:
    """What one artifact of the run should show: its newest content."""

    key: str | None
    type: str
    data: Any
    description: str


# The cards of a run, in the order each pass publishes them: the summary first, so that
# every other card is created after it, below it.
_KINDS = ("summary", "progress", "metrics", "checkpoint")


class _RunArtifacts:
    """The artifacts of one flow run, each created once and then updated in place by a
    helper thread, so that training never waits for the API.

    Only the newest content of each card waits to be published: a newer one replaces an
    unpublished older one. A pass that fails (the API is unreachable) leaves its content
    waiting; the next :meth:`publish`, a :meth:`republish` or :meth:`close` tries again.
    Each pass runs in the context of the call that asked for it (its Prefect settings,
    the API URL among them).

    Args:
        flow_run_id: The run the artifacts belong to.
        keys: The artifact key of each keyed kind (the progress bar has none).
        log: Where an outage is reported, in the context of the thread that creates this
            (the flow's: its settings say where a log line goes).
    """

    def __init__(
        self,
        flow_run_id: UUID,
        keys: dict[str, str],
        log: logging.Logger | logging.LoggerAdapter,
    ) -> None:
        self._flow_run_id = flow_run_id
        self._kind_of_key = {key: kind for kind, key in keys.items()}
        self._log = log
        self._home = contextvars.copy_context()
        self._cond = threading.Condition()
        self._cards: dict[str, _Card] = {}
        self._waiting: set[str] = set()  # kinds whose newest content the server lacks
        self._context = contextvars.copy_context()
        self._wake = False
        self._busy = False
        self._closing = False
        self._abandoned = False
        self._thread: threading.Thread | None = None
        self._epoch = 0  # the newest epoch the content shows, for messages
        self._failing_since: int | None = None  # the epoch of an outage's first failure
        # Owned by the helper thread: the ids of the cards on the server, and whether to
        # look for them there first (a new reporter after a flow retry, or a create whose
        # answer was lost).
        self._ids: dict[str, UUID] = {}
        self._adopt = True
        # Owned by the helper thread: its client, kept between passes (see _connection).
        self._client: SyncPrefectClient | None = None
        self._client_url: str | None = None
        self._settings = None

    @property
    def failing(self) -> bool:
        """True from a failed pass until one succeeds."""
        with self._cond:
            return self._failing_since is not None

    def show(self, kind: str, card: _Card, epoch: int) -> None:
        """Make ``card`` the newest content of ``kind`` (published at the next pass)."""
        with self._cond:
            self._cards[kind] = card
            self._waiting.add(kind)
            self._epoch = epoch

    def publish(self) -> None:
        """Publish what changed, from the helper thread, in the caller's context."""
        self._request(republish=False)

    def republish(self) -> None:
        """Publish every card's newest content again, at once, in the caller's context."""
        self._request(republish=True)

    def close(self, timeout_s: float) -> None:
        """Publish what is waiting, retrying for at most ``timeout_s``; then stop."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._context = contextvars.copy_context()
            if self._waiting:
                self._start()
            self._cond.notify_all()
            done = self._cond.wait_for(lambda: not self._waiting and not self._busy, timeout_s)
            if not done:
                self._abandoned = True
                self._cond.notify_all()
                self._say(
                    logging.WARNING,
                    "gave up publishing the artifacts of epoch %d: the Prefect API did not "
                    "take them within %g s; metrics.jsonl and the checkpoints hold the "
                    "full record",
                    self._epoch,
                    timeout_s,
                )
                return
        if self._thread is not None:
            self._thread.join()

    def _request(self, *, republish: bool) -> None:
        with self._cond:
            if self._closing:
                return
            if republish:
                self._waiting |= self._cards.keys()
            self._context = contextvars.copy_context()
            self._wake = True
            self._start()
            self._cond.notify_all()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="baton-artifacts", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        try:
            self._serve()
        finally:
            self._drop_client()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting and (self._wake or self._closing)):
                    if self._abandoned or (self._closing and not self._waiting):
                        return
                    self._cond.wait()
                if self._abandoned:
                    return
                self._wake = False
                self._busy = True
                work = {kind: self._cards[kind] for kind in self._waiting}
                self._waiting.clear()
                context, epoch = self._context, self._epoch
            done, lost, error = context.run(self._publish, work)
            with self._cond:
                self._busy = False
                if self._abandoned:  # close() has said what was not published
                    return
                # what failed waits again, unless newer content already does
                self._waiting |= (work.keys() - done) | ((lost - done) & self._cards.keys())
                self._note(error, epoch)
                self._cond.notify_all()
                if error is not None and self._closing and not self._abandoned:
                    self._cond.wait(CLOSE_RETRY_INTERVAL_S)

    def _note(self, error: Exception | None, epoch: int) -> None:
        """Log an outage once: when the first publish fails, and when one succeeds again."""
        if error is None:
            if self._failing_since is not None:
                self._say(
                    logging.INFO,
                    "published the artifacts of epoch %d after the API came back "
                    "(unreachable since epoch %d)",
                    epoch,
                    self._failing_since,
                )
                self._failing_since = None
        elif self._failing_since is None:
            self._failing_since = epoch
            self._say(
                logging.WARNING,
                "could not publish the artifacts of epoch %d (%s: %s); will be retried with "
                "the newest ones at the next epoch and at the end of the run",
                epoch,
                type(error).__name__,
                error,
            )

    def _say(self, level: int, message: str, *args: Any) -> None:
        """Log in the flow's context (always under the lock: one thread at a time)."""
        self._home.run(self._log.log, level, message, *args)

    def _publish(self, work: dict[str, _Card]) -> tuple[set[str], set[str], Exception | None]:
        """One pass: returns the kinds published, the kinds whose card was deleted (to
        create again), and the error that stopped the pass."""
        done: set[str] = set()
        lost: set[str] = set()
        try:
            with self._connection() as client:
                if self._adopt:
                    lost = self._find_cards(client)
                    self._adopt = False
                for kind in _KINDS:
                    if kind in work:
                        self._put(client, kind, work[kind])
                        done.add(kind)
        except Exception as err:  # an artifact is not worth a failed run; it waits
            self._adopt = True
            self._drop_client()
            return done, lost, err
        return done, lost, None

    @contextlib.contextmanager
    def _connection(self) -> Iterator[SyncPrefectClient]:
        """The helper thread's client, in settings of its own: few retries (a busy
        server's 503; get_client() would otherwise hand over the flow run's client, which
        retries a refused connection for minutes once it has connected: the next pass is
        the retry) and a short timeout, on the API URL of this pass's context.

        The settings and the client are made once and kept from pass to pass (a new one
        after a failed pass, or when the API URL changes): each new client builds an SSL
        context and each new settings object reads the environment and the profiles,
        ~5 ms of Python in all, and that time is taken from the training loop next door
        (the GIL; docs/performance.md)."""
        context = prefect.context.get_settings_context()
        url = context.settings.api.url
        if self._client is None or self._client_url != url:
            self._drop_client()
            self._settings = context.settings.copy_with_update(
                updates={PREFECT_CLIENT_MAX_RETRIES: PASS_RETRIES}
            )
            with prefect.context.SettingsContext(profile=context.profile, settings=self._settings):
                client = get_client(httpx_settings={"timeout": REQUEST_TIMEOUT_S}, sync_client=True)
                client.__enter__()
            self._client, self._client_url = client, url
        with prefect.context.SettingsContext(profile=context.profile, settings=self._settings):
            yield self._client

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.__exit__(None, None, None)

    def _put(self, client: SyncPrefectClient, kind: str, card: _Card) -> None:
        card_id = self._ids.get(kind)
        if card_id is not None:
            try:
                client.update_artifact(
                    card_id, ArtifactUpdate(data=card.data, description=card.description)
                )
                return
            except PrefectHTTPStatusError as err:
                if err.response.status_code != 404:
                    raise
                del self._ids[kind]  # deleted on the server: create it again
        self._ids[kind] = self._create(client, kind, card)

    def _create(self, client: SyncPrefectClient, kind: str, card: _Card) -> UUID:
        new = ArtifactCreate(
            key=card.key,
            type=card.type,
            data=card.data,
            description=card.description,
            flow_run_id=self._flow_run_id,
        )
        created = client.create_artifact(new).id
        for _ in range(_MAX_CREATE_TRIES - 1):
            if self._sorts_right(kind, created):
                break
            # the new version first: the key's "latest" never points at a deleted one
            replacement = client.create_artifact(new).id
            client.delete_artifact(created)
            created = replacement
        return created

    def _sorts_right(self, kind: str, artifact_id: UUID) -> bool:
        """Whether a card with this id keeps the summary first (see _SUMMARY_ID_FLOOR)."""
        if kind == "summary":
            others = (i for k, i in self._ids.items() if k != "summary")
            return artifact_id.int >= _SUMMARY_ID_FLOOR and all(artifact_id > i for i in others)
        summary = self._ids.get("summary")
        return summary is None or artifact_id < summary

    def _find_cards(self, client: SyncPrefectClient) -> set[str]:
        """Take over the run's cards already on the server, one of each kind: the others
        (and one that would sort above the summary) are deleted. Returns the kinds that
        have no card on the server now, to publish again."""
        found: dict[str, list[UUID]] = {}
        flow_run = ArtifactFilterFlowRunId(any_=[self._flow_run_id])
        for artifact in client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=flow_run)):
            kind = self._kind_of_key.get(artifact.key)
            if kind is None and artifact.key is None and artifact.type == "progress":
                kind = "progress"
            if kind is not None:
                found.setdefault(kind, []).append(artifact.id)
        for kind in _KINDS:
            ids = found.get(kind, [])
            known = self._ids.get(kind)
            keep = known if known in ids else (max if kind == "summary" else min)(ids, default=None)
            for extra in ids:
                if extra != keep:
                    client.delete_artifact(extra)
            if keep is not None and not (kind == "summary" or self._sorts_right(kind, keep)):
                client.delete_artifact(keep)
                keep = None
            if keep is None:
                self._ids.pop(kind, None)
            else:
                self._ids[kind] = keep
        return set(_KINDS) - self._ids.keys()


class EpochReporter:
    """Records each epoch of one flow run: metrics.jsonl, TensorBoard, and the run's
    artifacts, one card each, updated in place: a summary (first in the UI, described), a
    progress bar, the metrics table and a link to the newest committed checkpoint.

    Artifacts are published by a helper thread, so training never waits for the API;
    while the API is unreachable only the newest content waits, and it is published at
    the next epoch, at :meth:`republish` and at :meth:`close`. The artifacts describe the
    run; the checkpoints and metrics.jsonl are its record.

    Args:
        config: The run's resolved config.
        close_timeout_s: How long :meth:`close` waits for the last artifacts.
    """

    def __init__(self, config: dict[str, Any], *, close_timeout_s: float = CLOSE_TIMEOUT_S):
        self.experiment = Experiment.of(config_of(config))
        self.name = self.experiment.name
        # the keyed cards keep their keys across runs: the Artifacts page shows the newest
        self._keys = {kind: artifact_key(self.name, kind) for kind in _KINDS if kind != "progress"}
        self._close_timeout_s = close_timeout_s
        self._artifacts: _RunArtifacts | None = None
        self._started = False
        self._finished = False
        self._state: RunState | None = None
        self._rows: dict[int, dict[str, Any]] = {}
        self._linked: str | None = None
        self._published_at = time.monotonic()
        self._writer = None  # TensorBoard: one event file per run, flushed every epoch
        self._config = config
        self.tracker: RunTracker | None = None  # MLflow, when the operator set a tracker

    @property
    def publish_failed(self) -> bool:
        """True while the newest artifacts wait because the last publish failed."""
        return self._artifacts is not None and self._artifacts.failing

    def start(self, state: RunState) -> None:
        """Show the run from where it starts: a summary saying it trains (the full one
        replaces it at :meth:`finish`), its progress, and what earlier runs recorded.
        Outside a flow run (``task.fn`` calls) nothing is published."""
        self._started = True
        self._state = state
        self.tracker = _start_tracking(self.experiment, self._config, state)
        run_id = _flow_run_id()
        if run_id is None:
            return
        self._artifacts = _RunArtifacts(run_id, self._keys, run_logger())
        self._rows = {r["epoch"]: _row(r) for r in self.experiment.metrics.epochs()}
        self._set_summary(
            f"# {text(self.name)}\n\nTraining from epoch **{state.epoch}/{state.max_epochs}**; "
            "the full summary replaces this at the end of the run.",
            f"{text(self.name)}: training from epoch {state.epoch}/{state.max_epochs}",
        )
        self._set_cards(state)
        self._artifacts.publish()

    def report(self, state: RunState) -> None:
        """Record one finished epoch; publish the artifacts (at most every
        ARTIFACT_MIN_INTERVAL_S, always after the last epoch or a failed publish)."""
        record = {"epoch": state.epoch, "iter": state.iter, **state.metrics}
        self.experiment.metrics.append("epoch", record)
        self._tensorboard(state)
        if not self._started:
            self.start(state)
        if self.tracker is not None:
            self.tracker.checkpoints_committed()
        if self._artifacts is None:
            return
        self._state = state
        self._rows[state.epoch] = _row(record)
        self._set_cards(state)
        now = time.monotonic()
        if (
            state.finished
            or now - self._published_at >= ARTIFACT_MIN_INTERVAL_S
            or self._artifacts.failing
        ):
            self._published_at = now
            self._artifacts.publish()

    def finish(self, state: RunState, summary: str) -> None:
        """Replace the summary with the full one (:func:`summarize`'s markdown)."""
        self._finished = True
        if self._artifacts is None:
            return
        self._state = state
        done = " (training complete)" if state.finished else ""
        description = f"{text(self.name)}: summary at epoch {state.epoch}/{state.max_epochs}{done}"
        self._set_summary(summary, description)
        self._artifacts.publish()

    def end_tracking(self, *, finished: bool, timeout_s: float | None = None) -> list[str]:
        """Send what the tracker still lacks (bounded by the operator's close timeout, or
        ``timeout_s``) and end its run; returns the summary's lines about it (the MLflow
        run's link, what was lost), empty when nothing is tracked."""
        if self.tracker is None:
            return []
        self.tracker.close(finished=finished, timeout_s=timeout_s)
        return self.tracker.summary_lines()

    def republish(self) -> None:
        """Publish the newest artifacts again, at once: call it when the Prefect API is
        back after an outage. It runs in the caller's context (its Prefect settings):
        from another thread, start that thread with the flow's ``copy_context()``."""
        if self._artifacts is not None:
            self._artifacts.republish()

    def close(self, timeout_s: float | None = None) -> None:
        """Close the TensorBoard writer; publish what waits, for at most ``timeout_s``
        (the reporter's ``close_timeout_s`` by default). Without :meth:`finish`, the
        summary says where the run stopped."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        tracking = []
        if self.tracker is not None:  # a run that stops early: its tracker run is KILLED
            tracking = self.end_tracking(finished=False, timeout_s=timeout_s)
        if self._artifacts is None:
            return
        if not self._finished and self._state is not None:
            self._finished = True
            state = self._state
            where = f"epoch **{state.epoch}/{state.max_epochs}** (iteration {state.iter}/{state.max_iters})"
            lines = [
                f"# {text(self.name)}",
                "",
                f"Stopped at {where} before the end of training: the run's state and logs say why.",
            ]
            if state.checkpoint is not None:
                lines += ["", f"Newest checkpoint: {inline_code(state.checkpoint.uri)}"]
            if tracking:
                lines += ["", *tracking]
            self._set_summary(
                "\n".join(lines),
                f"{text(self.name)}: stopped at epoch {state.epoch}/{state.max_epochs}",
            )
        self._artifacts.close(self._close_timeout_s if timeout_s is None else timeout_s)

    def _set_summary(self, markdown: str, description: str) -> None:
        card = _Card(self._keys["summary"], "markdown", markdown, description)
        self._artifacts.show("summary", card, self._state.epoch)

    def _set_cards(self, state: RunState) -> None:
        """The progress, metrics and checkpoint cards at ``state``."""
        cards = self._artifacts
        cards.show(
            "progress",
            _Card(
                None,
                "progress",
                100.0 * state.iter / state.max_iters,
                f"training {text(self.name)}",
            ),
            state.epoch,
        )
        if self._rows:
            rows = [self._rows[e] for e in sorted(self._rows)]
            cards.show(
                "metrics",
                _Card(
                    self._keys["metrics"],
                    "table",
                    json.dumps(rows),
                    f"per-epoch metrics of {text(self.name)}",
                ),
                state.epoch,
            )
        ref = state.checkpoint
        if ref is not None and ref.sha256 != self._linked:
            self._linked = ref.sha256
            # Prefect's link artifact: markdown "[text](link)"
            link = f"[{text(ref.uri.rsplit('/', 1)[-1])}]({_link(ref.uri)})"
            description = f"epoch {ref.epoch}, iteration {ref.iter}, sha256 {ref.sha256[:12]}"
            cards.show(
                "checkpoint",
                _Card(self._keys["checkpoint"], "markdown", link, description),
                state.epoch,
            )

    def _tensorboard(self, state: RunState) -> None:
        """Scalars to TensorBoard, when tensorboard is installed (optional extra)."""
        writer_class = _summary_writer_class()
        if writer_class is None:
            return
        if self._writer is None:
            self._writer = writer_class(log_dir=str(self.experiment.tensorboard_dir))
        for key, value in state.metrics.items():
            self._writer.add_scalar(key, value, global_step=state.iter)
        self._writer.flush()


def _start_tracking(
    experiment: Experiment, config: dict[str, Any], state: RunState
) -> RunTracker | None:
    """The run's tracker, when the operator set one (``baton.tracking.settings``): the
    flow run is the tracker run of its lineage, continued by every run of the lineage."""
    head = experiment.store.head()
    run_id = _flow_run_id()
    name = (flow_run.get_name() if run_id is not None else None) or experiment.name
    identity = RunIdentity(
        flow_run_id=str(run_id) if run_id is not None else None,
        flow_run_name=name,
        flow_run_url=flow_run.get_flow_run_ui_url() if run_id is not None else None,
        experiment=experiment.name,
        experiment_dir=str(experiment.root),
        lineage=head.id if head is not None else 1,  # the first commit starts lineage 1
        config_hash=config_of(config).config_hash,
    )
    return RunTracker.start(
        experiment,
        identity,
        config,
        resume_epoch=state.epoch,
        resume_iter=state.iter,
    )


def _flow_run_id() -> UUID | None:
    """The flow run the caller runs in (its own, or its task run's), or None."""
    flow = FlowRunContext.get()
    if flow is not None and flow.flow_run is not None:
        return flow.flow_run.id
    task_run = TaskRunContext.get()
    return task_run.task_run.flow_run_id if task_run is not None else None


def _row(record: dict[str, Any]) -> dict[str, Any]:
    """A metrics table row: floats rounded, NaN empty (JSON has no NaN)."""
    return {
        k: (None if math.isnan(v) else round(v, 6)) if isinstance(v, float) else v
        for k, v in record.items()
        if k not in ("time", "kind")
    }


def _link(uri: str) -> str:
    """A checkpoint's URI as a link target: Prefect writes a link artifact as the markdown
    ``[text](link)``, so a path's parentheses, spaces and newlines are percent-encoded."""
    if io.is_local(uri):
        return "file://" + urllib.parse.quote(uri)
    return urllib.parse.quote(uri, safe=":/@%?=&#~+,;")


def curves_markdown(history: list[dict]) -> str:
    """The history's curves as a markdown image, or ``""`` without a plot.

    The image travels inside the markdown as a ``data:image/png;base64`` URI. Prefect's
    image artifact takes only a URL the browser can fetch, and a run has no address of its
    own to serve one from (a ``file://`` URL is refused by browsers; a route would have to
    outlive the run). The v2 UI renders a data-URI PNG in a markdown artifact (checked in
    headless Chromium: ``tests/deployments/test_ui.py`` asserts the image decoded), while
    it shows inline SVG as text; so: a small PNG (~30-50 kB of base64).
    """
    png = plot_history(history)
    if png is None:
        return ""
    return f"![loss, accuracy and learning rate per epoch](data:image/png;base64,{base64.b64encode(png).decode()})"


@task(name="summarize", cache_policy=NO_CACHE)
def summarize(
    config: dict[str, Any],
    state: RunState,
    started: float,
    note: str = "",
    tracking: list[str] | None = None,
) -> str:
    """The run's markdown summary: result, curves, checkpoints, config, time
    (:meth:`EpochReporter.finish` publishes it).

    Args:
        tracking: Lines about the tracker (:meth:`EpochReporter.end_tracking`).
    """
    cfg = config_of(config)
    experiment = Experiment.of(cfg)
    history = experiment.metrics.epochs()
    policy = cfg.checkpoint
    store = experiment.store
    checkpoints = store.list()
    best = store.best(policy.best_metric, policy.best_mode) if policy.best_metric else None
    # Every value from the config (the work_dir in paths, a metric name) is escaped: the
    # run form chooses them, and the UI renders this as markdown.
    lines = [f"# {text(cfg.experiment_name)}", ""]
    if note:
        lines += [note, ""]
    lines += [
        f"- position: epoch **{state.epoch}/{state.max_epochs}**, "
        f"iteration {state.iter}/{state.max_iters}",
        f"- wall time of this run: {time.time() - started:.1f} s",
    ]
    if best is not None:
        value = best.metrics[policy.best_metric]
        lines.append(f"- best {text(policy.best_metric)}: **{value:.4f}** (epoch {best.epoch})")
    lines += tracking or []
    for key in ("train/loss", "val/loss", "val/accuracy"):
        series = [r[key] for r in history if key in r]
        if series:
            lines.append(f"- {key}: `{sparkline(series)}` {series[0]:.4f} → {series[-1]:.4f}")
    curves = curves_markdown(history)
    if curves:
        lines += ["", "## Curves", "", curves]
    if history:
        lines += ["", history_table(history, markdown=True)]
    lines += ["", "## Checkpoints", ""]
    lines += [
        f"- {inline_code(r.uri)} epoch {r.epoch}, iter {r.iter}, sha256 {inline_code(r.sha256[:12])}"
        for r in checkpoints
    ]
    lines += ["", "## Resolved config", "", code_block(cfg.to_yaml().rstrip(), "yaml")]
    return "\n".join(lines)
