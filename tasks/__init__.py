"""Prefect tasks, one module per strategy operation. Each is short: rebuild or fetch the
live state, call the engine, return a small value."""

from tasks.checkpoint import load_checkpoint, save_checkpoint
from tasks.config import validate_config
from tasks.prepare import prepare
from tasks.report import EpochReporter, summarize
from tasks.resume import find_resume_point
from tasks.state import RunState
from tasks.train import train_epoch
from tasks.validate import validate

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
