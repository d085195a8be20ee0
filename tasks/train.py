"""Task: train one epoch on the live pipeline, with an emergency checkpoint on SIGTERM."""

import contextlib
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

from prefect.states import Completed, State

from baton.run import pipeline as pl
from baton.run.interrupt import TrainingInterrupted, deferred_termination
from baton.tasks._common import pipeline_task, run_logger
from baton.tasks.state import RunState, live_step

PROGRESS_REDRAW_S = 0.2


def _progress_printer(state: RunState, epoch: int):
    """A one-line progress bar on stderr, when the CLI asks for one (BATON_PROGRESS=1)."""
    if os.environ.get("BATON_PROGRESS") != "1":
        return None
    width = 30
    total = state.epoch_length
    last_drawn = [0.0]
    ended = [False]
    last_loss = [float("nan")]

    def show(running: Mapping, step: int, *, final: bool = False) -> None:
        """Redraw the bar (at most every PROGRESS_REDRAW_S); a full bar, or the ``final``
        call where the epoch ended or stopped, ends the line, once."""
        done = min(total, step)
        now = time.monotonic()
        last = final or done == total
        if ended[0] or (not last and now - last_drawn[0] < PROGRESS_REDRAW_S):
            return  # reading the loss waits for the device: not every iteration
        last_drawn[0] = now
        ended[0] = last
        filled = int(width * done / total)
        bar = "#" * filled + "-" * (width - filled)
        loss = last_loss[0] = running.get("loss", last_loss[0])  # a stop reports none
        line = f"\repoch {epoch}/{state.max_epochs} [{bar}] {done}/{total} loss {loss:.4f}"
        with contextlib.suppress(OSError):  # a closed terminal never fails the epoch
            sys.stderr.write(line + ("\n" if last else ""))
            sys.stderr.flush()

    return show


@pipeline_task("train-epoch", "train-epoch-{epoch}", retries=2)
def train_epoch(config: dict[str, Any], state: RunState, epoch: int) -> RunState | State:
    """Train epoch ``epoch`` (1-based) from ``state`` and return the new state.

    A SIGTERM (cancel, preemption) is held until the current iteration ends; then an
    iteration checkpoint is written and committed, the signal goes on to the flow, and
    the task ends ``Stopped`` (a Completed state: it did what was asked of it), its
    result the state at the iteration it stopped at.
    """
    if epoch != state.epoch + 1:
        raise ValueError(f"state is at epoch {state.epoch}; cannot train epoch {epoch}")
    # A retry continues from the epoch's newest iteration checkpoint: what the failed
    # attempt committed is never trained and committed again.
    with live_step(config, state, within_epoch=True) as pipeline, deferred_termination() as stop:
        try:
            metrics = pl.train_until_stopped(
                pipeline, stop, progress=_progress_printer(state, epoch)
            )
        except TrainingInterrupted as interrupted:
            ref = interrupted.checkpoint
            message = (
                f"stopped at iteration {ref.iter} of epoch {epoch}: emergency checkpoint "
                f"{ref.uri.rsplit('/', 1)[-1]} committed"
            )
            run_logger().warning("termination requested: %s", message)
            return Completed(
                name="Stopped", message=message, data=state.at(pipeline, checkpoint=ref)
            )
    run_logger().info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return state.at(pipeline, metrics=metrics)
