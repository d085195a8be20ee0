"""Rotation: which checkpoints of a lineage a commit keeps, and deleting the others.

Rotation acts within the committing lineage and never deletes the checkpoint just
committed, a checkpoint another lineage starts from, or another lineage's files. The
files it drops are deleted only after the commit that drops them is durable, and only
when they are regular files inside the store's own ``checkpoints/`` folder, or sharded
checkpoints there (real folders of regular files), each deleted whole or not at all
(:func:`baton.checkpoint.sharded.remove`: renamed away first, so a kill during the
deletion leaves no half checkpoint under its name; the next lock removes the rest).
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import asdict, dataclass, fields
from typing import Literal

from baton.checkpoint import manifest, sharded
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

    def normalised(self) -> RetentionPolicy:
        """The same policy with what it does not use left out: without ``keep_best``, the
        metric and its mode keep nothing, so two policies that differ only there are one."""
        if self.keep_best:
            return self
        return RetentionPolicy(keep_last=self.keep_last)

    def as_record(self) -> dict:
        """The policy as JSON (an experiment's ``experiment.json`` records it)."""
        return asdict(self.normalised())

    @classmethod
    def from_record(cls, record: dict) -> RetentionPolicy:
        """The policy :meth:`as_record` wrote.

        Raises:
            ValueError: ``record`` is not such a policy.
        """
        if not isinstance(record, dict) or set(record) - {f.name for f in fields(cls)}:
            raise ValueError(f"not a retention policy: {record!r}")
        keep_last = record.get("keep_last")
        if keep_last is not None and (type(keep_last) is not int):
            raise ValueError(f"keep_last must be a whole number or null, got {keep_last!r}")
        keep_best = record.get("keep_best", 0)
        if type(keep_best) is not int:
            raise ValueError(f"keep_best must be a whole number, got {keep_best!r}")
        metric = record.get("best_metric")
        if metric is not None and not isinstance(metric, str):
            raise ValueError(f"best_metric must be a string or null, got {metric!r}")
        return cls(
            keep_last=keep_last,
            keep_best=keep_best,
            best_metric=metric,
            best_mode=record.get("best_mode", "max"),
        ).normalised()

    def __str__(self) -> str:
        text = f"keep_last={self.keep_last}"
        if self.keep_best:
            text += f", keep_best={self.keep_best} by {self.best_metric} ({self.best_mode})"
        return text


def rotation_drops(policy: RetentionPolicy, state: manifest.ManifestState, new: dict) -> list[int]:
    """The ``seq`` of every entry that committing ``new`` under ``policy`` drops. It looks
    at the committing lineage's entries only (what rotation kept of it), never at the
    whole manifest, and at none without ``keep_last``."""
    if policy.keep_last is None:
        return []
    own = [e for e in state.lineage_entries(new["lineage"]) if e["path"] != new["path"]] + [new]
    return lineage_drops(policy, own, keep={new["seq"]} | state.parent_seqs())


def position(entry: dict) -> tuple[int, int, int]:
    """Where an entry stands in its lineage: its epoch and iteration, then its commit order
    (``seq``) among entries at one position."""
    return (entry["epoch"], entry["iter"], entry["seq"])


def lineage_drops(policy: RetentionPolicy, own: list[dict], *, keep: set[int]) -> list[int]:
    """The ``seq`` of every entry of one lineage (``own``, in commit order) that ``policy``
    drops; the entries in ``keep`` stay whatever the policy says. The one rule of rotation,
    used by a commit and by an operator's prune (:meth:`CheckpointStore.prune`).

    ``keep_last`` keeps the newest by position (:func:`position`), not by commit order:
    an older position committed late (a background save that finishes after the next
    iteration checkpoint, a stretch trained again) never displaces a newer one, so
    rotation never deletes a checkpoint newer than one ``keep_last`` keeps."""
    if policy.keep_last is None:
        return []
    newest = sorted(own, key=position)[-policy.keep_last :]
    keep = {e["seq"] for e in newest} | keep
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
    """Delete the checkpoints ``names`` that rotation dropped: a regular file, or a
    sharded checkpoint's folder whole; leave alone any that is gone, a link, or anything
    else (a device, a folder holding more than regular files)."""
    if not names:
        return
    dir_fd = files.open_checkpoint_dir()
    try:
        for name in names:
            try:
                mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(mode) and sharded.is_removable(files.checkpoint_dir / name):
                sharded.remove(files.checkpoint_dir / name)
            elif stat.S_ISREG(mode):
                _unlink_in(dir_fd, name)
            else:
                logger.warning(
                    "rotation left %s alone: neither a regular file nor a folder of regular "
                    "files (remove it by hand if it is not needed)",
                    name,
                )
                continue
            logger.info("rotation removed %s", files.checkpoint_dir / name)
    finally:
        os.close(dir_fd)
