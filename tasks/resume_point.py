"""Task: find the checkpoint a run continues from (the experiment's manifest decides),
and the lineage the run will record once it is prepared."""

from typing import Any

from prefect.runtime import flow_run

from baton.run import control
from baton.run.control import ResumePlan
from baton.tasks._common import pipeline_task, run_logger
from baton.tasks.state import config_of


@pipeline_task("find-resume-point", "find-resume-point-{config[experiment_name]}")
def find_resume_point(config: dict[str, Any], run_id: str | None = None) -> ResumePlan:
    """The newest valid checkpoint (``resume: auto``), none (``never``), or the one named,
    and the lineage the run starts, if any. Writes nothing: ``prepare`` records the plan
    once the checkpoint is loaded and every check has passed.

    Args:
        run_id: The run whose lineage this run continues; default: this flow run. An
            automatic restart passes the run its chain of restarts started from.
    """
    cfg = config_of(config)
    # The run's id marks the lineage a fresh start or a branch begins, so that a retry
    # (or an automatic restart) of the same run continues it instead of starting another.
    plan = control.plan_resume(cfg, run_id=run_id or flow_run.get_id())
    ref = plan.checkpoint
    if ref is None:
        run_logger().info("no checkpoint to resume for %s: starting fresh", cfg.experiment_name)
    else:
        run_logger().info(
            "resuming %s from %s (epoch %d, iter %d)",
            cfg.experiment_name,
            ref.uri,
            ref.epoch,
            ref.iter,
        )
    return plan
