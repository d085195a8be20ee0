"""Task: build the live pipeline (strategy, model, optimizer, schedulers, data)."""

from typing import Any

from baton.checkpoint.ref import CheckpointRef
from baton.run.control import ResumePlan
from baton.tasks._common import pipeline_task, run_logger
from baton.tasks.state import RunState, config_of, forget, live_pipeline


@pipeline_task("prepare", "prepare-{config[experiment_name]}", retries=1)
def prepare(config: dict[str, Any], checkpoint: ResumePlan | CheckpointRef | None) -> RunState:
    """Build the pipeline, load ``load_from`` weights or resume ``checkpoint``.

    Args:
        checkpoint: The plan ``find-resume-point`` made: its checkpoint is resumed, then
            the plan is recorded (the experiment's retention, a new lineage), only once
            every check has passed. A bare checkpoint (or ``None``) records nothing.

    Returns:
        The run's state: position, horizon, checkpoint.
    """
    cfg = config_of(config)
    forget(cfg)
    plan = checkpoint if isinstance(checkpoint, ResumePlan) else None
    if plan is not None:
        checkpoint = plan.checkpoint
    pipeline, _ = live_pipeline(cfg, None, checkpoint=checkpoint)
    if plan is not None:
        plan.record(cfg, pipeline.experiment, fork=pipeline.pending_fork is not None)
    state = RunState.of(pipeline, checkpoint)
    run_logger().info(
        "prepared %s: epoch %d/%d, iteration %d/%d, %d iterations per epoch",
        cfg.experiment_name,
        state.epoch,
        state.max_epochs,
        state.iter,
        state.max_iters,
        state.epoch_length,
    )
    return state
