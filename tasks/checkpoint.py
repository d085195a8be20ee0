"""Tasks: save a checkpoint of the live pipeline; load one into a fresh pipeline."""

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from baton import pipeline as pl
from baton.checkpoint import io
from baton.checkpoint.ref import CheckpointRef
from baton.tasks._common import retry_unless_permanent, run_logger
from baton.tasks.state import RunState, config_of, live_pipeline, using
from baton.trust import Trust


@task(
    name="save-checkpoint",
    task_run_name="save-checkpoint-epoch-{epoch}",
    retries=2,
    retry_delay_seconds=1,
    retry_condition_fn=retry_unless_permanent,
    cache_policy=NO_CACHE,
)
def save_checkpoint(config: dict[str, Any], state: RunState, epoch: int) -> RunState:
    """Write and commit a checkpoint.

    With ``checkpoint.async_save`` (and before the last epoch) the write goes on in the
    background; the state then carries the newest checkpoint already committed. The
    flow's per-epoch report publishes the link artifact to it.
    """
    cfg = config_of(config)
    pipeline, _ = live_pipeline(cfg, state)
    with using(cfg, pipeline):
        if cfg.checkpoint.async_save and not state.finished:
            ref = pipeline.strategy.wait_for_checkpoints() or state.checkpoint
            pl.save(pipeline, state.metrics, background=True)
            if ref is None:
                return state
        else:
            ref = pl.save(pipeline, state.metrics)
    run_logger().info("committed %s (%d bytes, sha256 %s)", ref.uri, ref.size, ref.sha256[:12])
    return state.model_copy(update={"checkpoint": ref})


@task(
    name="load-checkpoint",
    task_run_name="load-checkpoint",
    retries=1,
    retry_condition_fn=retry_unless_permanent,
    cache_policy=NO_CACHE,
)
def load_checkpoint(config: dict[str, Any], checkpoint: CheckpointRef | str) -> RunState:
    """Build a pipeline from ``config`` and restore ``checkpoint`` into it (kept live)."""
    cfg = config_of(config)
    if isinstance(checkpoint, str):
        # A path from a run's parameters: the experiment's folder or an operator's root.
        checkpoint = Trust.from_environment().check_checkpoint(
            checkpoint,
            experiment_dir=Path(cfg.work_dir) / cfg.experiment_name,
            what="checkpoint",
        )
        size, digest = io.sha256_of(checkpoint)
        checkpoint = CheckpointRef(uri=checkpoint, epoch=0, iter=0, size=size, sha256=digest)
    pipeline, _ = live_pipeline(cfg, None, checkpoint=checkpoint)
    return RunState.of(pipeline, checkpoint)
