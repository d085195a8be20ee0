"""Task: evaluate the live model on the validation data."""

from typing import Any

from baton.run import pipeline as pl
from baton.tasks._common import pipeline_task, run_logger
from baton.tasks.state import RunState, live_step


@pipeline_task("evaluate", "evaluate-epoch-{epoch}", retries=1)
def evaluate(config: dict[str, Any], state: RunState, epoch: int) -> RunState:
    """Validation metrics (``val/*``) merged into the state's metrics."""
    with live_step(config, state) as pipeline:
        metrics = pl.evaluate(pipeline)
    run_logger().info(
        "validation after epoch %d: %s",
        epoch,
        ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()),
    )
    return state.model_copy(update={"metrics": {**state.metrics, **metrics}})
