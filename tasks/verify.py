"""Task: train a checkpoint again from an earlier one and compare the two bit for bit."""

from baton.run.verify import verify_experiment
from baton.tasks._common import pipeline_task, run_logger


@pipeline_task("verify-checkpoint", "verify-checkpoints")
def verify_checkpoint(
    experiment_dir: str, a: str | None = None, b: str | None = None, work_dir: str | None = None
) -> dict:
    """The verdict (:meth:`baton.run.verify.Verdict.summary`) of training ``b`` again from
    ``a`` (default: the experiment's newest checkpoint from the one before it). Never
    retried: the same pair gives the same verdict, and a refusal is permanent."""
    summary = verify_experiment(experiment_dir, a, b, work_dir=work_dir).summary()
    logger = run_logger()
    logger.info("%s", summary["verdict"])
    for line in summary["differences"]:
        logger.warning("  %s", line)
    return summary
