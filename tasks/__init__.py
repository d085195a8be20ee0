"""Prefect tasks, one module per strategy operation. Each is short: rebuild or fetch the
live state, call the engine, return a small value."""

from tasks.checkpoint import load_checkpoint, save_checkpoint
from tasks.config import validate_config
from tasks.prepare import prepare
from tasks.report import report_epoch, start_progress, summarize
from tasks.resume import find_resume_point
from tasks.state import RunState
from tasks.train import train_epoch
from tasks.validate import validate

__all__ = [
    "RunState",
    "find_resume_point",
    "load_checkpoint",
    "prepare",
    "report_epoch",
    "save_checkpoint",
    "start_progress",
    "summarize",
    "train_epoch",
    "validate",
    "validate_config",
]
