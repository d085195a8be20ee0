"""Task: train one epoch on the live pipeline, with an emergency checkpoint on SIGTERM."""

import os
import sys
import time
from collections.abc import Mapping
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from baton import pipeline as pl
from baton.checkpoint.ref import CheckpointName
from baton.interrupt import TrainingInterrupted, deferred_termination
from baton.tasks._common import retry_unless_permanent, run_logger
from baton.tasks.state import RunState, config_of, live_pipeline, using

PROGRESS_REDRAW_S = 0.2


def _progress_printer(state: RunState, epoch: int):
    """A one-line progress bar on stderr, when the CLI asks for one (BATON_PROGRESS=1)."""
    if os.environ.get("BATON_PROGRESS") != "1":
        return None
    width = 30
    total = state.epoch_length
    last_drawn = [0.0]

    def show(running: Mapping, step: int) -> None:
        done = min(total, step)
        now = time.monotonic()
        if done < total and now - last_drawn[0] < PROGRESS_REDRAW_S:
            return  # reading the loss waits for the device: not every iteration
        last_drawn[0] = now
        filled = int(width * done / total)
        bar = "#" * filled + "-" * (width - filled)
        loss = running.get("loss", float("nan"))
        sys.stderr.write(
            f"\repoch {epoch}/{state.max_epochs} [{bar}] {done}/{total} loss {loss:.4f}"
        )
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


@task(
    name="train-epoch",
    task_run_name="train-epoch-{epoch}",
    retries=2,
    retry_delay_seconds=0,
    retry_condition_fn=retry_unless_permanent,
    cache_policy=NO_CACHE,
)
def train_epoch(config: dict[str, Any], state: RunState, epoch: int) -> RunState:
    """Train epoch ``epoch`` (1-based) from ``state`` and return the new state.

    A SIGTERM (cancel, preemption) is held until the current iteration ends; then an
    iteration checkpoint is written and committed, and the signal goes on to Prefect.
    """
    if epoch != state.epoch + 1:
        raise ValueError(f"state is at epoch {state.epoch}; cannot train epoch {epoch}")
    cfg = config_of(config)
    logger = run_logger()
    pipeline, reused = live_pipeline(cfg, state)
    if not reused:
        logger.info(
            "rebuilt the pipeline from %s", state.checkpoint.uri if state.checkpoint else "scratch"
        )
    strategy = pipeline.strategy
    show = _progress_printer(state, epoch)

    with deferred_termination() as stop, using(cfg, pipeline):

        def on_iteration(running: Mapping) -> None:
            if strategy.iter % cfg.train.log_interval == 0:
                record = {"iter": strategy.iter, **{f"train/{k}": v for k, v in running.items()}}
                pl.append_metrics(strategy.experiment_dir, "iteration", record)
            if show is not None:
                show(running, strategy.step_in_epoch or pipeline.epoch_length)
            stop.check()

        try:
            metrics = pl.train_one_epoch(pipeline, on_iteration=on_iteration)
        except TrainingInterrupted:
            ref = pl.save(pipeline, {}, name=CheckpointName.for_iter(strategy.iter))
            logger.warning(
                "termination requested: emergency checkpoint %s at iteration %d",
                ref.uri,
                strategy.iter,
            )
            raise
    logger.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return state.at(pipeline, metrics=metrics)
