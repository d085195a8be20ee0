"""Task: validate the live model."""

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from baton import pipeline as pl
from baton.tasks._common import retry_unless_permanent, run_logger
from baton.tasks.state import RunState, config_of, live_pipeline, using


@task(
    name="validate",
    task_run_name="validate-epoch-{epoch}",
    retries=1,
    retry_condition_fn=retry_unless_permanent,
    cache_policy=NO_CACHE,
)
def validate(config: dict[str, Any], state: RunState, epoch: int) -> RunState:
    """Validation metrics (``val/*``) merged into the state's metrics."""
    cfg = config_of(config)
    pipeline, _ = live_pipeline(cfg, state)
    with using(cfg, pipeline):
        metrics = pl.validate(pipeline)
    run_logger().info(
        "validation after epoch %d: %s",
        epoch,
        ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()),
    )
    return state.model_copy(update={"metrics": {**state.metrics, **metrics}})
