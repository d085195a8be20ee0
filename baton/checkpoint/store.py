"""``CheckpointStore``: the checkpoints of one experiment, as its manifest records them.

Layout of an experiment's home (``work_dir/<experiment>/``)::

    checkpoints/epoch_0003.pth   the files
    manifest.json                what was committed: name, position, size, sha256, metrics
    .lock                        held by the process that trains the experiment

A checkpoint exists for :meth:`CheckpointStore.latest` only once it is in the manifest
and its bytes still match the recorded size and sha256. Rotation (keep the last k, keep
the best k by a metric) deletes files only after the new checkpoint is committed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from baton.checkpoint import io
from baton.checkpoint.ref import CheckpointName, CheckpointRef
from baton.errors import CheckpointCorruptError, CheckpointError, ExperimentLockedError

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1

# Manifest updates are read-modify-write; a background save commits from another thread.
_MANIFEST_LOCKS: dict[Path, threading.Lock] = {}
_MANIFEST_LOCKS_GUARD = threading.Lock()


def _manifest_lock(root: Path) -> threading.Lock:
    with _MANIFEST_LOCKS_GUARD:
        return _MANIFEST_LOCKS.setdefault(root, threading.Lock())


@dataclass(frozen=True)
class RetentionPolicy:
    """Which checkpoints survive rotation.

    Attributes:
        keep_last: Keep this many newest checkpoints (``None``: keep all).
        keep_best: Also keep this many best checkpoints by ``best_metric``.
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


class CheckpointStore:
    """The committed checkpoints of one experiment folder.

    Args:
        root: The experiment folder (``work_dir/<experiment>``). Nothing is created
            until the first commit.
        retention: What rotation keeps; by default everything.
    """

    def __init__(self, root: str | os.PathLike, *, retention: RetentionPolicy | None = None):
        self.root = Path(root).expanduser().absolute()
        self.retention = retention or RetentionPolicy()

    @property
    def checkpoint_dir(self) -> Path:
        """Where checkpoint files live."""
        return self.root / "checkpoints"

    @property
    def manifest_path(self) -> Path:
        """The manifest file."""
        return self.root / "manifest.json"

    def path_for(self, name: CheckpointName | str) -> Path:
        """Path of a checkpoint file with this name."""
        return self.checkpoint_dir / str(name)

    def owns(self, path: str | os.PathLike) -> bool:
        """True when ``path`` is a file directly inside this store's checkpoint folder."""
        return Path(path).expanduser().absolute().parent == self.checkpoint_dir

    # manifest -------------------------------------------------------------------------

    def _read_manifest(self) -> list[dict]:
        try:
            text = self.manifest_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        try:
            data = json.loads(text)
            entries = data["checkpoints"]
            if not isinstance(entries, list):
                raise TypeError("'checkpoints' is not a list")
            for entry in entries:
                self._to_ref(entry)
                int(entry["seq"])
            return entries
        except (ValueError, KeyError, TypeError) as err:
            logger.warning(
                "manifest %s is unreadable (%s); rebuilding it from the checkpoint files",
                self.manifest_path,
                err,
            )
            return self._rebuild_locked()

    def rebuild(self) -> list[CheckpointRef]:
        """Rebuild the manifest from the checkpoint files that load safely.

        The unreadable manifest is kept beside it as ``manifest.json.corrupt-<time>``.
        Each file is loaded (``weights_only``) to check that it is a whole checkpoint;
        its position and metrics come from its ``meta``.
        """
        with _manifest_lock(self.root):
            self._rebuild_locked()
        return self.list()

    def _rebuild_locked(self) -> list[dict]:
        if self.manifest_path.exists():
            aside = self.manifest_path.with_name(f"manifest.json.corrupt-{int(time.time())}")
            os.replace(self.manifest_path, aside)
        entries: list[dict] = []
        files = sorted(self.checkpoint_dir.glob("*.pth")) if self.checkpoint_dir.exists() else []
        for path in files:
            if CheckpointName.parse(path.name) is None:
                continue
            try:
                checkpoint = io.load(str(path))
                meta = checkpoint.get("meta") or {}
                size, digest = io.sha256_of(str(path))
                entries.append(
                    {
                        "uri": str(path),
                        "epoch": int(meta["epoch"]),
                        "iter": int(meta["iter"]),
                        "size": size,
                        "sha256": digest,
                        "metrics": {k: float(v) for k, v in (meta.get("metrics") or {}).items()},
                        "seq": len(entries) + 1,
                        "created": path.stat().st_mtime,
                    }
                )
            except (CheckpointError, KeyError, TypeError, ValueError, AttributeError) as err:
                logger.warning("not taking %s into the rebuilt manifest: %s", path.name, err)
        self._write_manifest(entries)
        return entries

    def _write_manifest(self, entries: list[dict]) -> None:
        payload = {"version": MANIFEST_VERSION, "checkpoints": entries}
        io.write_text_atomic(self.manifest_path, json.dumps(payload, indent=2, sort_keys=True))

    @staticmethod
    def _to_ref(entry: dict) -> CheckpointRef:
        return CheckpointRef(
            uri=entry["uri"],
            epoch=entry["epoch"],
            iter=entry["iter"],
            size=entry["size"],
            sha256=entry["sha256"],
            metrics=entry.get("metrics", {}),
        )

    # queries --------------------------------------------------------------------------

    def list(self) -> list[CheckpointRef]:
        """Committed checkpoints, oldest training position first (not verified)."""
        entries = sorted(self._read_manifest(), key=lambda e: (e["iter"], e["epoch"], e["seq"]))
        return [self._to_ref(e) for e in entries]

    def verify(self, ref: CheckpointRef) -> None:
        """Check that the file still has the committed size and sha256.

        Raises:
            CheckpointNotFoundError: The file is gone.
            CheckpointCorruptError: Its size or checksum differs.
        """
        path = io.local_path(ref.uri) if io.is_local(ref.uri) else None
        if path is not None:
            try:
                actual_size = path.stat().st_size
            except FileNotFoundError:
                actual_size = -1
            if actual_size >= 0 and actual_size != ref.size:
                raise CheckpointCorruptError(
                    f"{ref.uri} has {actual_size} bytes but {ref.size} were committed "
                    "(truncated or overwritten)"
                )
        size, digest = io.sha256_of(ref.uri)
        if size != ref.size or digest != ref.sha256:
            raise CheckpointCorruptError(
                f"{ref.uri} does not match its manifest entry: sha256 {digest[:12]}... "
                f"instead of {ref.sha256[:12]}... (damaged on disk?)"
            )

    def is_valid(self, ref: CheckpointRef) -> bool:
        """:meth:`verify` as a boolean, logging why a checkpoint is skipped."""
        try:
            self.verify(ref)
        except (CheckpointCorruptError, FileNotFoundError) as err:
            logger.warning("skipping checkpoint: %s", err)
            return False
        return True

    def latest(self) -> CheckpointRef | None:
        """The newest committed checkpoint whose bytes verify; ``None`` if there is none."""
        for ref in reversed(self.list()):
            if self.is_valid(ref):
                return ref
        logger.info("no valid checkpoint in %s", self.root)
        return None

    def best(self, metric: str, mode: Literal["max", "min"] = "max") -> CheckpointRef | None:
        """The valid checkpoint with the best value of ``metric``; ``None`` if none has it."""
        scored = [r for r in self.list() if metric in r.metrics]
        scored.sort(key=lambda r: r.metrics[metric], reverse=(mode == "max"))
        for ref in scored:
            if self.is_valid(ref):
                return ref
        return None

    def find(self, uri: str) -> CheckpointRef | None:
        """The committed entry for a file, if the manifest has one."""
        target = str(io.local_path(uri).absolute()) if io.is_local(uri) else uri
        for ref in self.list():
            if ref.uri == target:
                return ref
        return None

    # changes --------------------------------------------------------------------------

    def commit(
        self,
        uri: str,
        *,
        epoch: int,
        iter: int,
        size: int,
        sha256: str,
        metrics: dict[str, float] | None = None,
    ) -> CheckpointRef:
        """Record a fully written checkpoint in the manifest, then apply retention.

        An entry for the same file is replaced (a checkpoint written again at the same
        position). Files dropped by retention are deleted after the manifest is written.
        """
        uri = str(io.local_path(uri).absolute()) if io.is_local(uri) else uri
        with _manifest_lock(self.root):
            return self._commit_locked(uri, epoch, iter, size, sha256, metrics)

    def _commit_locked(self, uri, epoch, iter, size, sha256, metrics) -> CheckpointRef:
        entries = [e for e in self._read_manifest() if e["uri"] != uri]
        seq = max((e["seq"] for e in entries), default=0) + 1
        entry = {
            "uri": uri,
            "epoch": epoch,
            "iter": iter,
            "size": size,
            "sha256": sha256,
            "metrics": {k: float(v) for k, v in (metrics or {}).items()},
            "seq": seq,
            "created": time.time(),
        }
        entries.append(entry)
        ref = self._to_ref(entry)
        keep, drop = self._rotate(entries)
        self._write_manifest(keep)
        for old in drop:
            if io.is_local(old["uri"]):
                io.local_path(old["uri"]).unlink(missing_ok=True)
                logger.info("rotation removed %s", old["uri"])
        return ref

    def _rotate(self, entries: list[dict]) -> tuple[list[dict], list[dict]]:
        policy = self.retention
        if policy.keep_last is None:
            return entries, []
        by_position = sorted(entries, key=lambda e: (e["iter"], e["epoch"], e["seq"]))
        keep_ids = {id(e) for e in by_position[-policy.keep_last :]}
        if policy.keep_best and policy.best_metric:
            scored = [e for e in entries if policy.best_metric in e.get("metrics", {})]
            scored.sort(
                key=lambda e: e["metrics"][policy.best_metric],
                reverse=(policy.best_mode == "max"),
            )
            keep_ids |= {id(e) for e in scored[: policy.keep_best]}
        keep = [e for e in entries if id(e) in keep_ids]
        drop = [e for e in entries if id(e) not in keep_ids]
        return keep, drop

    def _remove_stale_temporaries(self) -> None:
        """Delete temporary files a killed writer left (only called under the lock, before
        this run writes anything, so none of them belongs to a live write)."""
        for folder in (self.root, self.checkpoint_dir):
            if folder.exists():
                for leftover in folder.glob(".*.tmp"):
                    leftover.unlink(missing_ok=True)
                    logger.info("removed %s, left by an interrupted write", leftover.name)

    @contextlib.contextmanager
    def lock(self, *, wait: bool = False) -> Iterator[None]:
        """Hold the experiment's exclusive lock (an ``flock`` on ``root/.lock``).

        Args:
            wait: Block until the lock is free instead of failing at once.

        Raises:
            ExperimentLockedError: Another process holds it and ``wait`` is False.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        lock_path = self.root / ".lock"
        with open(lock_path, "a+") as handle:
            flags = fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB)
            try:
                fcntl.flock(handle.fileno(), flags)
            except BlockingIOError as err:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise ExperimentLockedError(
                    f"experiment {self.root.name!r} is being trained by {holder}; wait for it "
                    "to finish (or stop it) before starting another run"
                ) from err
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}")
            handle.flush()
            self._remove_stale_temporaries()
            try:
                yield
            finally:
                handle.seek(0)
                handle.truncate()
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
