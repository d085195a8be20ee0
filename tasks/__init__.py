"""Prefect tasks, one module per pipeline operation. Each body is a few lines: declared
with :func:`~baton.tasks._common.pipeline_task`, it takes the live pipeline at the run's
position (:func:`~baton.tasks.state.live_step`), calls one step of :mod:`baton.run.pipeline`
and returns a small value."""

from baton.tasks.checkpoint import load_checkpoint, save_checkpoint
from baton.tasks.config import validate_config
from baton.tasks.evaluate import evaluate
from baton.tasks.prepare import prepare
from baton.tasks.report import EpochReporter, summarize
from baton.tasks.resume_point import find_resume_point
from baton.tasks.state import RunState
from baton.tasks.train import train_epoch
from baton.tasks.verify import verify_checkpoint

__all__ = [
    "EpochReporter",
    "RunState",
    "evaluate",
    "find_resume_point",
    "load_checkpoint",
    "prepare",
    "save_checkpoint",
    "summarize",
    "train_epoch",
    "validate_config",
    "verify_checkpoint",
]
