"""The training pipeline flow: validate the config, resume, prepare, train epoch by epoch.

Parameters are flat on purpose: the Prefect server merges a run's parameters with the
deployment's defaults one level deep, so a nested config object sent partially would
silently reset its other fields. Here each parameter stands alone.
"""

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from baton.checkpoint.store import CheckpointStore
from baton.interrupt import deferred_termination
from tasks import (
    EpochReporter,
    RunState,
    find_resume_point,
    prepare,
    save_checkpoint,
    summarize,
    train_epoch,
    validate,
    validate_config,
)
from tasks.state import config_of, forget


class _RunFormatter(logging.Formatter):
    """Names the task or flow run a record comes from (Prefect puts it in the record)."""

    def format(self, record: logging.LogRecord) -> str:
        record.run = getattr(record, "task_run_name", None) or getattr(
            record, "flow_run_name", record.name
        )
        return super().format(record)


@contextlib.contextmanager
def _run_log_file(cfg: dict) -> Iterator[None]:
    """Copy this flow run's log lines (flow, tasks, engine) into the experiment folder."""
    folder = Path(cfg["work_dir"]) / cfg["experiment_name"] / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(folder / f"flow-{flow_run.get_id()}.log", encoding="utf-8")
    handler.setFormatter(_RunFormatter("%(asctime)s %(levelname)s %(run)s %(message)s"))
    loggers = [logging.getLogger(n) for n in ("prefect.flow_runs", "prefect.task_runs", "baton")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        handler.close()


def _due(epoch: int, interval: int, state: RunState) -> bool:
    return epoch % interval == 0 or state.finished


@flow(name="train-pipeline", retries=1, retry_delay_seconds=0, log_prints=True)
def train_pipeline(
    config: str | dict[str, Any] = "configs/digits_mlp.yaml",
    overrides: list[str] | None = None,
    experiment_name: str | None = None,
    resume: str | None = None,
    work_dir: str | None = None,
    fork: bool | None = None,
) -> RunState:
    """Train a pipeline to its horizon, continuing from the experiment's newest checkpoint.

    Args:
        config: Path of a YAML file in configs/, YAML text, or an inline mapping.
        overrides: Dotted-key overrides, e.g. train.max_epochs=20 or optim_wrapper.optimizer.lr=0.01.
        experiment_name: Overrides the config's experiment_name (the folder checkpoints go to).
        resume: 'auto' (newest valid checkpoint), 'never', or a checkpoint path; default: the config's.
        work_dir: Overrides the config's work_dir.
        fork: True continues from the checkpoint even where the config changes the run
            (data, optimizer, schedule, seed...), recorded as a fork; default: the config's.
    """
    started = time.time()
    settings = {
        "experiment_name": experiment_name,
        "resume": resume,
        "work_dir": work_dir,
        "fork": fork,
    }
    cfg = validate_config(config, overrides, {k: v for k, v in settings.items() if v is not None})
    store = CheckpointStore(f"{cfg['work_dir']}/{cfg['experiment_name']}")
    # A SIGTERM (cancel, preemption) between tasks waits for the current task; inside the
    # training task it waits for the current iteration, then an emergency checkpoint.
    with store.lock(), _run_log_file(cfg), deferred_termination() as stop:
        state = prepare(cfg, find_resume_point(cfg))
        if state.finished:
            print(f"{cfg['experiment_name']} is already complete at epoch {state.epoch}")
            summarize(cfg, state, started, note="Already complete: nothing left to train.")
            return state
        reporter = EpochReporter(cfg)
        try:
            while not state.finished:
                if stop.requested:
                    if state.checkpoint is None or state.checkpoint.iter != state.iter:
                        state = save_checkpoint(cfg, state, state.epoch)
                    stop.check()
                epoch = state.epoch + 1
                state = train_epoch(cfg, state, epoch)
                if cfg["val_data"] and _due(state.epoch, cfg["train"]["val_interval"], state):
                    state = validate(cfg, state, epoch)
                if _due(state.epoch, cfg["checkpoint"]["interval"], state):
                    state = save_checkpoint(cfg, state, epoch)
                reporter.report(state)
            summarize(cfg, state, started)
        finally:
            reporter.close()
    forget(config_of(cfg))
    return state
