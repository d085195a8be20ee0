"""Helpers shared by the task modules: loggers, retry conditions, artifact keys."""

import logging
import re

from prefect import get_run_logger
from prefect.context import FlowRunContext, TaskRunContext
from prefect.exceptions import MissingContextError

from baton.errors import (
    CheckpointMismatchError,
    ConfigError,
    DataError,
    ExperimentLockedError,
    UnsafeCheckpointError,
)

# Failures a retry cannot fix: the same inputs would fail the same way.
PERMANENT_ERRORS = (
    ConfigError,
    CheckpointMismatchError,
    DataError,
    ExperimentLockedError,
    UnsafeCheckpointError,
)


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a run, a plain logger outside (``task.fn`` calls)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("tasks")


def retry_unless_permanent(task, task_run, state) -> bool:
    """Retry condition: retry everything but bad configs and mismatched checkpoints."""
    try:
        state.result()
    except PERMANENT_ERRORS:
        return False
    except BaseException:
        return True
    return True


def artifact_key(experiment_name: str, suffix: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for an experiment."""
    slug = re.sub(r"[^a-z0-9]+", "-", experiment_name.lower()).strip("-") or "experiment"
    return f"{slug}-{suffix}"


def in_run() -> bool:
    """True inside a Prefect flow or task run (artifacts need one; ``task.fn`` calls have none)."""
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None
