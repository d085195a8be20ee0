"""Prefect tasks, one module per strategy operation. Each is short: rebuild or fetch the
live state, call the engine, return a small value."""

from baton.tasks.checkpoint import load_checkpoint, save_checkpoint
from baton.tasks.config import validate_config
from baton.tasks.prepare import prepare
from baton.tasks.report import EpochReporter, summarize
from baton.tasks.resume import find_resume_point
from baton.tasks.state import RunState
from baton.tasks.train import train_epoch
from baton.tasks.validate import validate

__all__ = [
    "EpochReporter",
    "RunState",
    "find_resume_point",
    "load_checkpoint",
    "prepare",
    "save_checkpoint",
    "summarize",
    "train_epoch",
    "validate",
    "validate_config",
]
