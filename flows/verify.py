"""Verify that a checkpoint was trained as its lineage says, and publish the verdict.

Deployable (``deployments/prefect.yaml``: weekly, on the nightly experiment's newest
checkpoint against the one before it). The run ends Completed when the replay is bitwise
equal, Failed (:class:`~baton.errors.NotReproducedError`) when it differs, so that a
notification or automation on failed runs reports it; either way the verdict is a
markdown artifact.
"""

from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from baton.errors import NotReproducedError
from baton.flows.pool import checked_run, work_dir_of
from baton.markdown import inline_code
from baton.tasks import verify_checkpoint
from baton.tasks._common import artifact_key, permanent_errors_end_the_run
from baton.trust import deployment_environment


@task(name="publish-verdict", cache_policy=NO_CACHE)
def publish_verdict(experiment_dir: str, summary: dict) -> None:
    """The verdict as a markdown artifact (its values escaped by
    :meth:`baton.run.verify.Verdict.markdown`: the run form chooses the folder)."""
    name = Path(experiment_dir).name or "experiment"
    create_markdown_artifact(
        key=artifact_key(name, "verification"),
        markdown=f"# Verification of {inline_code(experiment_dir)}\n\n{summary['markdown']}\n",
    )


@flow(name="verify-checkpoint", log_prints=True)
def verify_checkpoints(experiment_dir: str, a: str | None = None, b: str | None = None) -> dict:
    """Train checkpoint ``b`` again from ``a`` and compare bit for bit.

    Args:
        experiment_dir: The experiment's folder (``work_dir/<experiment_name>``); it must
            lie in the operator's checkpoint roots (a deployment's ``checkpoint_roots``).
        a: The earlier checkpoint (a file of the experiment); with ``b`` unset, the
            newest checkpoint is verified against the one before it.
        b: The later checkpoint, of ``a``'s lineage.

    Returns:
        The verdict (:meth:`baton.run.verify.Verdict.summary`).
    """
    with permanent_errors_end_the_run():
        _, deployment = checked_run()
    # A deployment's run reads the experiment of another deployment only where the
    # operator gave it that folder as a checkpoint root (docs/security.md); B's config
    # is validated with this deployment's own folder, where nothing is written either.
    with deployment_environment(deployment), permanent_errors_end_the_run():
        summary = verify_checkpoint(experiment_dir, a, b, work_dir=work_dir_of(deployment, None))
    publish_verdict(experiment_dir, summary)
    if not summary["equal"]:
        with permanent_errors_end_the_run():
            raise NotReproducedError(
                f"{summary['verdict']}: {'; '.join(summary['differences'][:3])}"
            )
    return summary
