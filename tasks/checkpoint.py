"""Tasks: save a checkpoint of the live pipeline; load one into a fresh pipeline."""

from typing import Any

from baton.checkpoint.ref import CheckpointRef
from baton.experiment import Experiment
from baton.run import control
from baton.run import pipeline as pl
from baton.tasks._common import pipeline_task, run_logger
from baton.tasks.state import RunState, config_of, live_pipeline, live_step


@pipeline_task("save-checkpoint", "save-checkpoint-epoch-{epoch}", retries=2, retry_delay_seconds=1)
def save_checkpoint(
    config: dict[str, Any], state: RunState, epoch: int, background: bool = False
) -> RunState:
    """Write and commit a checkpoint.

    With ``background`` (:func:`baton.run.control.plan_after_epoch` decides) the write goes
    on while training does; the state then carries the newest checkpoint already
    committed. The flow's per-epoch report publishes the link artifact to it.
    """
    with live_step(config, state) as pipeline:
        ref = pl.save_epoch(pipeline, state.metrics, background=background) or state.checkpoint
    if ref is None:
        return state
    run_logger().info("committed %s (%d bytes, sha256 %s)", ref.uri, ref.size, ref.sha256[:12])
    return state.model_copy(update={"checkpoint": ref})


@pipeline_task("load-checkpoint", "load-checkpoint", retries=1)
def load_checkpoint(config: dict[str, Any], checkpoint: CheckpointRef | str) -> RunState:
    """Build a pipeline from ``config`` and restore ``checkpoint`` into it (kept live)."""
    cfg = config_of(config)
    if isinstance(checkpoint, str):
        # A path from a run's parameters: the experiment's folder or an operator's root.
        uri = control.checked_checkpoint(Experiment.of(cfg), checkpoint, "checkpoint")
        checkpoint = CheckpointRef.of_file(uri)
    pipeline, _ = live_pipeline(cfg, None, checkpoint=checkpoint)
    return RunState.of(pipeline, checkpoint)
