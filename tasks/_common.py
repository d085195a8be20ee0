"""Helpers shared by the task modules: the task declaration, loggers, retry conditions,
artifact keys."""

import contextlib
import hashlib
import logging
import re
from collections.abc import Iterator

from prefect import get_client, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, TaskRunContext
from prefect.exceptions import MissingContextError

from baton.errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    ConfigError,
    DataError,
    ExperimentLockedError,
    ExperimentMovedError,
    ExperimentNotWritableError,
    NotReproducedError,
    RestartRefusedError,
    TrainingDivergedError,
    UnsafeCheckpointError,
)

# Failures a retry cannot fix: the same inputs would fail the same way. ConfigError
# covers refused input too (UntrustedInputError): a module, scheme or path the operator
# did not allow.
PERMANENT_ERRORS = (
    ConfigError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    DataError,
    ExperimentLockedError,
    ExperimentMovedError,
    ExperimentNotWritableError,
    NotReproducedError,
    RestartRefusedError,
    TrainingDivergedError,
    UnsafeCheckpointError,
)


def pipeline_task(name: str, run_name: str, *, retries: int = 0, retry_delay_seconds: float = 0):
    """Declare a task of the pipeline: retried on transient faults only, never cached
    (its inputs name a live pipeline whose state a cache key cannot see)."""
    return task(
        name=name,
        task_run_name=run_name,
        retries=retries,
        retry_delay_seconds=retry_delay_seconds,
        retry_condition_fn=retry_unless_permanent if retries else None,
        cache_policy=NO_CACHE,
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


@contextlib.contextmanager
def permanent_errors_end_the_run() -> Iterator[None]:
    """Let a permanent error fail the flow run once, without its flow retries.

    Prefect 3.9's flows have no retry condition: the server turns every Failed proposal
    into a retry while retries remain. On a permanent error this sets the flow run's
    retries to zero first, so the run ends Failed with the error as its state message,
    and only transient faults are retried.
    """
    try:
        yield
    except PERMANENT_ERRORS:
        _stop_flow_retries()
        raise


def _stop_flow_retries() -> None:
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(context.flow_run.id)
        policy = run.empirical_policy.model_copy(update={"retries": 0, "max_retries": 0})
        client.update_flow_run(context.flow_run.id, empirical_policy=policy)


def artifact_key(experiment_name: str, suffix: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for an experiment:
    a readable slug of the name plus a short hash of the exact name, so experiments whose
    names differ only in case or punctuation (``digits_mlp``, ``Digits.MLP``) never share
    (and overwrite) each other's artifacts."""
    slug = re.sub(r"[^a-z0-9]+", "-", experiment_name.lower()).strip("-")[:48].strip("-")
    digest = hashlib.sha256(experiment_name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{slug or 'experiment'}-{digest}-{suffix}"


def in_run() -> bool:
    """True inside a Prefect flow or task run (artifacts need one; ``task.fn`` calls have none)."""
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None
