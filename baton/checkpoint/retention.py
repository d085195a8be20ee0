"""Rotation: which checkpoints of a lineage a commit keeps, and deleting the others.

Rotation acts within the committing lineage and never deletes the checkpoint just
committed, a checkpoint another lineage starts from, or another lineage's files. The
files it drops are deleted only after the commit that drops them is durable, and only
when they are regular files inside the store's own ``checkpoints/`` folder.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from typing import Literal

from baton.checkpoint import manifest
from baton.checkpoint.files import ExperimentFiles

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetentionPolicy:
    """Which checkpoints of a lineage survive rotation.

    Attributes:
        keep_last: Keep this many newest checkpoints of the lineage (``None``: keep all).
        keep_best: Also keep this many best checkpoints of the lineage by ``best_metric``
            (a NaN or infinite value is never best).
        best_metric: Metric name used by ``keep_best``.
        best_mode: ``"max"`` or ``"min"``.
    """

    keep_last: int | None = None
    keep_best: int = 0
    best_metric: str | None = None
    best_mode: Literal["max", "min"] = "max"

    def __post_init__(self) -> None:
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"keep_last must be at least 1 or None, got {self.keep_last}")
        if self.keep_best < 0:
            raise ValueError(f"keep_best must be >= 0, got {self.keep_best}")
        if self.keep_best and not self.best_metric:
            raise ValueError("keep_best needs best_metric, the metric to rank checkpoints by")
        if self.best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {self.best_mode!r}")


def rotation_drops(policy: RetentionPolicy, state: manifest.ManifestState, new: dict) -> list[int]:
    """The ``seq`` of every entry that committing ``new`` under ``policy`` drops."""
    if policy.keep_last is None:
        return []
    own = [
        e
        for e in state.entries.values()
        if e["lineage"] == new["lineage"] and e["path"] != new["path"]
    ] + [new]
    keep = {e["seq"] for e in own[-policy.keep_last :]} | {new["seq"]} | state.parent_seqs()
    if policy.keep_best and policy.best_metric:
        metric = policy.best_metric
        scored = [e for e in own if manifest.finite(e["metrics"].get(metric))]
        scored.sort(key=lambda e: e["metrics"][metric], reverse=(policy.best_mode == "max"))
        keep |= {e["seq"] for e in scored[: policy.keep_best]}
    return [e["seq"] for e in own if e["seq"] not in keep]


def _unlink_in(dir_fd: int, name: str) -> None:
    """Delete a rotated checkpoint file (only called for regular files)."""
    os.unlink(name, dir_fd=dir_fd)


def delete_rotated(files: ExperimentFiles, names: list[str]) -> None:
    """Delete the checkpoint files ``names`` that rotation dropped, leaving alone any
    that is gone or is not a regular file."""
    if not names:
        return
    dir_fd = files.open_checkpoint_dir()
    try:
        for name in names:
            try:
                mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(mode):
                logger.warning("rotation left %s alone: not a regular file", name)
                continue
            _unlink_in(dir_fd, name)
            logger.info("rotation removed %s", files.checkpoint_dir / name)
    finally:
        os.close(dir_fd)
