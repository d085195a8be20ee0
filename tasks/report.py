"""Reporting: per-epoch metrics (metrics.jsonl; table, progress and checkpoint-link
artifacts), called by the flow between tasks, and the run summary task."""

import asyncio
import contextvars
import functools
import time
import urllib.parse
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from prefect import task
from prefect.artifacts import (
    acreate_link_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
    create_markdown_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.utilities.asyncutils import run_coro_as_sync

from baton.checkpoint import io
from baton.experiment import Experiment
from baton.experiment.metrics import history_table
from baton.markdown import code_block, inline_code, text
from baton.tasks._common import artifact_key, in_run, run_logger
from baton.tasks.state import RunState, config_of

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


class EpochReporter:
    """Records each epoch of one flow run: metrics.jsonl, TensorBoard, and (throttled)
    the metrics table, the progress bar and a link to the newest committed checkpoint.

    Artifacts are published by a helper thread (in the flow run's context), so training
    never waits for the API; :meth:`close` waits for the last ones. A failed publish is
    logged and does not fail the run: the artifacts describe the run, the checkpoints
    and metrics.jsonl are its record.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.experiment = Experiment.of(config_of(config))
        self.name = self.experiment.name
        self._published_at = time.monotonic()
        self._progress_id = None
        self._linked: str | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="baton-artifacts")
        self._pending: list[Future] = []
        self._writer = None  # TensorBoard: one event file per run, flushed every epoch

    def report(self, state: RunState) -> None:
        record = {"epoch": state.epoch, "iter": state.iter, **state.metrics}
        self.experiment.metrics.append("epoch", record)
        self._tensorboard(state)
        now = time.monotonic()
        if not in_run() or (
            not state.finished and now - self._published_at < ARTIFACT_MIN_INTERVAL_S
        ):
            return
        self._published_at = now
        context = contextvars.copy_context()
        self._pending.append(self._pool.submit(context.run, self._publish_now, state))

    def close(self) -> None:
        """Wait for the artifacts still being published; close the TensorBoard writer."""
        if self._writer is not None:
            self._writer.close()
        for future in self._pending:
            future.result()
        self._pending.clear()
        self._pool.shutdown()

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

    def _publish_now(self, state: RunState) -> None:
        try:
            run_coro_as_sync(self._publish(state))
        except Exception as err:  # an artifact is not worth a failed run
            run_logger().warning(
                "could not publish the artifacts of epoch %d: %s", state.epoch, err
            )

    async def _publish(self, state: RunState) -> None:
        rows = [
            {
                k: (round(v, 6) if isinstance(v, float) else v)
                for k, v in r.items()
                if k not in ("time", "kind")
            }
            for r in self.experiment.metrics.epochs()
        ]
        progress = 100.0 * state.iter / state.max_iters
        calls = [
            acreate_table_artifact(
                key=artifact_key(self.name, "metrics"),
                table=rows,
                description=f"per-epoch metrics of {text(self.name)}",
            ),
            self._progress(progress),
        ]
        ref = state.checkpoint
        if ref is not None and ref.sha256 != self._linked:
            self._linked = ref.sha256
            calls.append(
                acreate_link_artifact(
                    key=artifact_key(self.name, "checkpoint"),
                    link=_link(ref.uri),
                    link_text=text(ref.uri.rsplit("/", 1)[-1]),
                    description=f"epoch {ref.epoch}, iteration {ref.iter}, "
                    f"sha256 {ref.sha256[:12]}",
                )
            )
        await asyncio.gather(*calls)

    async def _progress(self, progress: float) -> None:
        if self._progress_id is None:
            self._progress_id = await acreate_progress_artifact(
                progress=progress, description=f"training {text(self.name)}"
            )
        else:
            await aupdate_progress_artifact(self._progress_id, progress)


def _link(uri: str) -> str:
    """A checkpoint's URI as a link target: Prefect writes a link artifact as the markdown
    ``[text](link)``, so a path's parentheses, spaces and newlines are percent-encoded."""
    if io.is_local(uri):
        return "file://" + urllib.parse.quote(uri)
    return urllib.parse.quote(uri, safe=":/@%?=&#~+,;")


@task(name="summarize", cache_policy=NO_CACHE)
def summarize(config: dict[str, Any], state: RunState, started: float, note: str = "") -> str:
    """Publish a markdown summary: result, curves, checkpoints, config, time."""
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
    for key in ("train/loss", "val/loss", "val/accuracy"):
        series = [r[key] for r in history if key in r]
        if series:
            lines.append(f"- {key}: `{sparkline(series)}` {series[0]:.4f} → {series[-1]:.4f}")
    if history:
        lines += ["", history_table(history, markdown=True)]
    lines += ["", "## Checkpoints", ""]
    lines += [
        f"- {inline_code(r.uri)} epoch {r.epoch}, iter {r.iter}, sha256 {inline_code(r.sha256[:12])}"
        for r in checkpoints
    ]
    lines += ["", "## Resolved config", "", code_block(cfg.to_yaml().rstrip(), "yaml")]
    markdown = "\n".join(lines)
    if in_run():
        create_markdown_artifact(
            markdown=markdown, key=artifact_key(cfg.experiment_name, "summary")
        )
    return markdown
