"""Evaluate a checkpoint on the validation data and publish the metrics."""

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from baton.errors import ConfigError
from baton.flows.pool import checked_run, work_dir_of
from baton.markdown import inline_code, table_cell
from baton.tasks import evaluate, load_checkpoint, validate_config
from baton.tasks._common import artifact_key, permanent_errors_end_the_run
from baton.tasks.state import config_of, forget
from baton.trust import deployment_environment

NO_VAL_DATA = "the config has no val_data to evaluate on; add a val_data section to the config"


@task(name="publish-evaluation", cache_policy=NO_CACHE)
def publish_evaluation(experiment_name: str, checkpoint: str, metrics: dict[str, float]) -> None:
    """A markdown artifact with the checkpoint's validation metrics (the path and the
    names escaped: the run form chooses the path)."""
    rows = "\n".join(f"| {table_cell(k)} | {v:.4f} |" for k, v in sorted(metrics.items()))
    create_markdown_artifact(
        key=artifact_key(experiment_name, "evaluation"),
        markdown=f"# Evaluation of {inline_code(checkpoint)}\n\n"
        f"| metric | value |\n|---|---|\n{rows}\n",
    )


@flow(name="evaluate-checkpoint", log_prints=True)
def evaluate_checkpoint(
    checkpoint: str,
    config: str | dict[str, Any] = "configs/digits_mlp.yaml",
    overrides: list[str] | None = None,
) -> dict[str, float]:
    """Validation metrics of a checkpoint.

    Args:
        checkpoint: Path or URI of the checkpoint.
        config: The pipeline config it was trained with (path, YAML text or mapping).
        overrides: Dotted-key overrides of that config.
    """
    with permanent_errors_end_the_run():
        _, deployment = checked_run()
    # A deployment's run reads checkpoints of its own folder and of the checkpoint roots
    # the operator gave it (docs/security.md).
    with deployment_environment(deployment):
        with permanent_errors_end_the_run():
            settings = {"resume": "never", "work_dir": work_dir_of(deployment, None)}
            cfg = validate_config(config, overrides, settings)
            if not cfg["val_data"]:
                raise ConfigError(NO_VAL_DATA)
            state = load_checkpoint(cfg, checkpoint)
        try:
            state = evaluate(cfg, state, state.epoch)
        finally:
            forget(config_of(cfg))  # the live pipeline and its loader workers end with the run
    publish_evaluation(cfg["experiment_name"], checkpoint, state.metrics)
    return state.metrics
