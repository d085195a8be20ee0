"""``CheckpointStore``: the checkpoints of one experiment, as its manifest records them.

Layout of an experiment's home (``work_dir/<experiment>/``)::

    checkpoints/epoch_0003.pth     the files of lineage 1
    checkpoints/L2-epoch_0001.pth  the files of lineage 2 (never the same file as lineage 1's)
    manifest.json                  snapshot: lineages and committed checkpoints (paths relative)
    manifest.journal               what was committed since the snapshot, one record a line
    .lock                          held by the process that trains the experiment

**Lineages.** Every checkpoint belongs to a lineage: a chain of runs that continue each
other. A run that resumes automatically continues the newest lineage; a fresh start
(``resume: never``), a resume from an older checkpoint (a branch) and a fork with a new
config start a new one (:meth:`CheckpointStore.start_lineage`). "Latest" is the newest
commit of the newest lineage (or, while that lineage has none yet, the checkpoint it
started from). Rotation acts within the committing lineage and never deletes the
checkpoint just committed, a checkpoint another lineage starts from, or another
lineage's files.

**Only its own files.** Manifest paths are relative to the experiment folder, so a moved
experiment resumes where it was and a copied one is independent. The store reads,
verifies and deletes only regular files directly inside its own ``checkpoints/`` folder,
opened without following links; anything else a manifest names (an absolute path, a
``..``, a link, a device) is reported and never followed or deleted.

**Commit cost.** A commit appends one checksummed line to the journal and fsyncs it, so
its cost does not grow with the history; the journal is folded into a new snapshot
(written atomically) once it holds more records than the snapshot has entries (the
format: :mod:`baton.checkpoint.manifest`). A crash leaves at worst a torn last line,
which readers ignore and the next writer cuts off. Manifests of the first format (one
JSON file with absolute URIs) are read as they are and rewritten in this format by the
first writer (a run holding the lock). Readers never write: repairs belong to runs that
hold the experiment's lock.

A checkpoint exists for :meth:`CheckpointStore.latest` only once it is in the manifest
and its bytes still match the recorded size and sha256.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from baton.checkpoint import io, manifest
from baton.checkpoint.manifest import MANIFEST_VERSION
from baton.checkpoint.ref import CheckpointName, CheckpointRef
from baton.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointOutsideError,
    CheckpointWriteError,
    ExperimentLockedError,
    ManifestVersionError,
)

logger = logging.getLogger(__name__)

_READ_ATTEMPTS = 50

# Manifest updates are read-modify-write; a background save commits from another thread.
_MANIFEST_LOCKS: dict[Path, threading.Lock] = {}
_MANIFEST_LOCKS_GUARD = threading.Lock()


def _manifest_lock(root: Path) -> threading.Lock:
    with _MANIFEST_LOCKS_GUARD:
        return _MANIFEST_LOCKS.setdefault(root, threading.Lock())


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


@dataclass(frozen=True)
class Lineage:
    """A chain of runs that continue each other, and the checkpoints they committed.

    Attributes:
        id: 1, 2, ... in the order lineages were started; the highest is the newest.
        started: When it was started (seconds since the epoch).
        reason: ``first``, ``fresh`` (``resume: never``), ``branch`` (resumed from an
            older checkpoint), ``fork`` (a new config from a checkpoint), ``migrated`` or
            ``rebuilt``.
        parent: The committed checkpoint it starts from, if it is in this store.
        parent_outside: The file it starts from when that is not one of this store's
            checkpoints (recorded, never read by the store).
        run: The run that started it, when the caller named one.
        config_hash: The config it was started with, when the caller gave one.
        checkpoints: Its committed checkpoints in commit order.
    """

    id: int
    started: float
    reason: str
    parent: CheckpointRef | None = None
    parent_outside: str | None = None
    run: str | None = None
    config_hash: str | None = None
    checkpoints: tuple[CheckpointRef, ...] = ()


@dataclass(frozen=True)
class CheckedEntry:
    """One committed checkpoint as :meth:`CheckpointStore.check` found it."""

    ref: CheckpointRef
    lineage: int
    path: str
    problem: str | None


@dataclass(frozen=True)
class StoreCheck:
    """One committed state of the manifest, every checkpoint in it verified.

    Attributes:
        entries: The committed checkpoints in commit order, each with its problem (or None).
        lineages: All lineages, oldest first.
        outside: Manifest entries the store does not follow (``(what, why)`` pairs).
        latest: What :meth:`CheckpointStore.latest` returns for this state.
        problem: Why the manifest on disk could not be read as it is (the listing then
            comes from the checkpoint files), or ``None``.
        pending: A repair the next run holding the lock will write (a migration from the
            first format, cutting a torn journal line), or ``None``.
    """

    entries: list[CheckedEntry]
    lineages: list[Lineage]
    outside: list[tuple[str, str]]
    latest: CheckpointRef | None
    problem: str | None
    pending: str | None


def _unlink_in(dir_fd: int, name: str) -> None:
    """Delete a rotated checkpoint file (only called for regular files)."""
    os.unlink(name, dir_fd=dir_fd)


@dataclass
class _Cached:
    """The state last read from an experiment's files, and which files those were."""

    snapshot_key: tuple | None
    journal_key: tuple | None  # (dev, ino) of the journal read
    offset: int  # journal bytes consumed
    state: manifest.ManifestState


# Per process and experiment folder: a commit reads only the journal lines written since
# the last read (none, when this process wrote them), so its cost does not grow with the
# history. Keyed by the files' identity and size, so another process's writes are seen.
_CACHE: dict[Path, _Cached] = {}


class CheckpointStore:
    """The committed checkpoints of one experiment folder.

    Args:
        root: The experiment folder (``work_dir/<experiment>``). Nothing is created
            until the first commit.
        retention: What rotation keeps within a lineage; by default everything.
    """

    def __init__(self, root: str | os.PathLike, *, retention: RetentionPolicy | None = None):
        self.root = Path(root).expanduser().absolute()
        self.retention = retention or RetentionPolicy()

    @property
    def checkpoint_dir(self) -> Path:
        """Where checkpoint files live."""
        return self.root / manifest.CHECKPOINTS

    @property
    def manifest_path(self) -> Path:
        """The manifest's snapshot file."""
        return self.root / "manifest.json"

    @property
    def journal_path(self) -> Path:
        """The manifest's journal: records committed since the snapshot."""
        return self.root / "manifest.journal"

    def path_for(self, name: CheckpointName | str) -> Path:
        """Path of a checkpoint file with this name."""
        return self.checkpoint_dir / str(name)

    def owns(self, path: str | os.PathLike) -> bool:
        """True when ``path`` is a file directly inside this store's checkpoint folder
        (reached through this root or another path to the same folder)."""
        return self._own_name(str(path)) is not None

    def _own_name(self, uri: str) -> str | None:
        if not io.is_local(uri):
            return None
        path = io.local_path(uri).absolute()
        if path.name in ("", ".", ".."):
            return None
        if path.parent == self.checkpoint_dir:
            return path.name
        try:
            same = os.path.samestat(os.stat(path.parent), os.stat(self.checkpoint_dir))
        except OSError:
            return None
        return path.name if same else None

    # reading --------------------------------------------------------------------------

    def _load(self) -> manifest.ManifestState:
        """The committed state (callers hold the manifest's thread lock). Never writes."""
        for _ in range(_READ_ATTEMPTS):
            snapshot_key = manifest.stat_key(self.manifest_path)
            journal_key = manifest.stat_key(self.journal_path)
            cached = _CACHE.get(self.root)
            if (
                cached is not None
                and cached.state.problem is not None
                and cached.snapshot_key == snapshot_key
                and cached.journal_key == (journal_key[:2] if journal_key else None)
            ):
                return cached.state  # still unreadable: the files were rebuilt in memory once
            if (
                cached is not None
                and cached.snapshot_key == snapshot_key
                and journal_key is not None
                and cached.journal_key == journal_key[:2]
                and journal_key[2] >= cached.offset
                and cached.state.problem is None
            ):
                if journal_key[2] == cached.offset:
                    return cached.state
                if self._read_new_records(cached):
                    return cached.state
                _CACHE.pop(self.root, None)  # anything odd: read everything again
            try:
                state, offset, journal_id = self._read_files()
            except _Changed:
                continue
            if state.problem is not None:
                journal_id = journal_key[:2] if journal_key else None
            if manifest.stat_key(self.manifest_path) != snapshot_key:
                continue  # replaced while we read the journal: read again
            _CACHE[self.root] = _Cached(snapshot_key, journal_id, offset, state)
            return state
        state = self._state_from_files(f"{self.manifest_path} kept changing while being read")
        return state

    def _read_new_records(self, cached: _Cached) -> bool:
        """Apply the journal lines written since ``cached`` was read; False when they
        cannot be read as intact records (then the caller reads everything again)."""
        try:
            data = manifest.read_regular_file(self.journal_path, cached.offset)
            records, used, problem = manifest.parse_journal(data)
            if problem is not None:
                return False
            for record in records:
                cached.state.apply(record)
        except (OSError, CheckpointError, ValueError, KeyError, TypeError):
            return False
        cached.offset += used
        cached.state.pending = "truncate" if used < len(data) else None
        return True

    def _read_files(self) -> tuple[manifest.ManifestState, int, tuple | None]:
        try:
            text = (
                manifest.read_regular_file(self.manifest_path)
                if self.manifest_path.exists()
                else None
            )
            if text is None and not os.path.lexists(self.journal_path):
                empty = manifest.ManifestState()
                empty.pending = "compact"  # the first writer creates both files
                return empty, 0, None
            if text is None:
                raise ValueError("there is a journal but no manifest.json")
            state = manifest.read_snapshot(json.loads(text))
        except ManifestVersionError:
            raise
        except (OSError, ValueError, KeyError, TypeError, CheckpointError) as err:
            return self._state_from_files(f"{self.manifest_path} is unreadable ({err})"), 0, None
        if state.pending == "migrate":
            return state, 0, None
        try:
            st = os.stat(self.journal_path, follow_symlinks=False)
        except FileNotFoundError:
            state.pending = "compact"
            return state, 0, None
        try:
            data = manifest.read_regular_file(self.journal_path)
        except (OSError, CheckpointError) as err:
            return self._state_from_files(f"{self.journal_path} is unreadable ({err})"), 0, None
        records, offset, problem = manifest.parse_journal(data)
        header = records[0] if records else None
        if header is None or "generation" not in header:
            if data:
                problem = problem or "the journal has no header line"
            else:
                state.pending = "compact"
                return state, 0, None
        if problem is not None:
            return self._state_from_files(f"{self.journal_path}: {problem}"), 0, None
        generation = int(header["generation"])
        if generation > state.generation:
            raise _Changed  # compacted between reading the snapshot and the journal
        if generation < state.generation:
            state.pending = "compact"  # a compaction was cut short: the snapshot has it all
            return state, 0, None
        try:
            for record in records[1:]:
                state.apply(record)
        except (ValueError, KeyError, TypeError) as err:
            return self._state_from_files(f"{self.journal_path}: a bad record ({err})"), 0, None
        if offset < len(data):
            state.pending = "truncate"
        return state, offset, (st.st_dev, st.st_ino)

    def _state_from_files(self, problem: str) -> manifest.ManifestState:
        """A state rebuilt in memory from the checkpoint files that load safely."""
        logger.warning("manifest of %s: %s; using the checkpoint files instead", self.root, problem)
        state = manifest.ManifestState()
        state.problem = problem
        found: list[tuple[int, int, str, dict]] = []
        for name in self._own_file_names():
            parsed = CheckpointName.parse(name)
            if parsed is None:
                continue
            try:
                size, digest = self._hash_own(name)
                checkpoint = io.load(str(self.checkpoint_dir / name))
                meta = checkpoint.get("meta") or {}
                entry = {
                    "path": f"{manifest.CHECKPOINTS}/{name}",
                    "lineage": parsed.lineage,
                    "epoch": int(meta["epoch"]),
                    "iter": int(meta["iter"]),
                    "size": size,
                    "sha256": digest,
                    "metrics": manifest.clean_metrics(meta.get("metrics")),
                    "created": os.stat(self.checkpoint_dir / name).st_mtime,
                }
                found.append((parsed.lineage, entry["iter"], name, entry))
            except (
                CheckpointError,
                OSError,
                KeyError,
                TypeError,
                ValueError,
                AttributeError,
            ) as err:
                logger.warning("not taking %s into the rebuilt manifest: %s", name, err)
        for lineage in sorted({f[0] for f in found}):
            state.add_lineage({"id": lineage, "started": 0.0, "reason": "rebuilt"})
        for *_, entry in sorted(found, key=lambda f: f[:3]):
            state.add_entry({**entry, "seq": state.next_seq})
        return state

    def _own_file_names(self) -> list[str]:
        try:
            dir_fd = self._open_checkpoint_dir()
        except (FileNotFoundError, CheckpointOutsideError):
            return []
        try:
            return sorted(
                name
                for name in os.listdir(dir_fd)
                if stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
            )
        finally:
            os.close(dir_fd)

    def _open_checkpoint_dir(self) -> int:
        try:
            return os.open(self.checkpoint_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise
        except OSError as err:
            what = "a symbolic link" if os.path.islink(self.checkpoint_dir) else "not a folder"
            raise CheckpointOutsideError(
                f"{self.checkpoint_dir} is {what}; the store does not follow it (make it a "
                "real folder: the experiment folder itself may live on any disk)"
            ) from err

    def _hash_own(self, name: str, expected_size: int | None = None) -> tuple[int, str]:
        """Size and sha256 of ``checkpoints/<name>``, a regular file, opened without
        following a link.

        Raises:
            CheckpointNotFoundError: The file is gone.
            CheckpointOutsideError: It is a link, a folder or a device.
        """
        dir_fd = self._open_checkpoint_dir()
        try:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
            except FileNotFoundError as err:
                raise CheckpointNotFoundError(
                    f"{self.checkpoint_dir / name} does not exist (deleted?)"
                ) from err
            except OSError as err:
                raise CheckpointOutsideError(
                    f"{self.checkpoint_dir / name} is a symbolic link; the store does not follow it"
                ) from err
        finally:
            os.close(dir_fd)
        with os.fdopen(fd, "rb") as handle:
            st = os.fstat(handle.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointOutsideError(
                    f"{self.checkpoint_dir / name} is not a regular file; the store does not read it"
                )
            if expected_size is not None and st.st_size != expected_size:
                raise CheckpointCorruptError(
                    f"{self.checkpoint_dir / name} has {st.st_size} bytes but {expected_size} "
                    "were committed (truncated or overwritten)"
                )
            size, digest = 0, hashlib.sha256()
            while chunk := handle.read(8 << 20):
                digest.update(chunk)
                size += len(chunk)
        return size, digest.hexdigest()

    def _view(self) -> manifest.ManifestState:
        with _manifest_lock(self.root):
            return self._load()

    def _ref(self, entry: dict) -> CheckpointRef:
        return manifest.entry_ref(entry, self.checkpoint_dir)

    # queries --------------------------------------------------------------------------

    def list(self) -> list[CheckpointRef]:
        """Committed checkpoints of every lineage, in commit order (not verified)."""
        with _manifest_lock(self.root):
            state = self._load()
            return [self._ref(e) for e in state.entries.values()]

    def lineages(self) -> list[Lineage]:
        """Every lineage with its committed checkpoints, oldest lineage first."""
        with _manifest_lock(self.root):
            return self._lineages_of(self._load())

    def _lineages_of(self, state: manifest.ManifestState) -> list[Lineage]:
        members: dict[int, list[CheckpointRef]] = {k: [] for k in state.lineages}
        for entry in state.entries.values():
            members.setdefault(entry["lineage"], []).append(self._ref(entry))
        out = []
        for lineage_id in sorted(members):
            raw = state.lineages.get(lineage_id) or {"started": 0.0, "reason": "", "parent": None}
            parent, outside = None, None
            if raw["parent"] and "seq" in raw["parent"]:
                entry = state.entries.get(int(raw["parent"]["seq"]))
                parent = self._ref(entry) if entry else None
                outside = None if entry else f"checkpoint #{raw['parent']['seq']} (gone)"
            elif raw["parent"]:
                outside = str(raw["parent"].get("uri"))
            out.append(
                Lineage(
                    id=lineage_id,
                    started=raw["started"],
                    reason=raw["reason"],
                    parent=parent,
                    parent_outside=outside,
                    run=raw.get("run"),
                    config_hash=raw.get("config_hash"),
                    checkpoints=tuple(members[lineage_id]),
                )
            )
        return out

    def head(self) -> Lineage | None:
        """The newest lineage (the one commits go to and auto-resume continues)."""
        lineages = self.lineages()
        return lineages[-1] if lineages else None

    def lineage_of(self, ref: CheckpointRef) -> int | None:
        """The lineage a committed checkpoint belongs to; ``None`` if it is not committed."""
        name = self._own_name(ref.uri)
        with _manifest_lock(self.root):
            state = self._load()
            seq = state.by_path.get(f"{manifest.CHECKPOINTS}/{name}") if name else None
            return state.entries[seq]["lineage"] if seq is not None else None

    def verify(self, ref: CheckpointRef) -> None:
        """Check that the file still has the committed size and sha256.

        Raises:
            CheckpointNotFoundError: The file is gone.
            CheckpointCorruptError: Its size or checksum differs.
            CheckpointOutsideError: The reference is not a regular file inside this
                store's ``checkpoints/`` folder (a path elsewhere, a link, a device).
        """
        name = self._own_name(ref.uri)
        if name is None:
            raise CheckpointOutsideError(
                f"{ref.uri} is not inside {self.checkpoint_dir}; the store verifies only its "
                "own checkpoints"
            )
        size, digest = self._hash_own(name, expected_size=ref.size)
        if size != ref.size or digest != ref.sha256:
            raise CheckpointCorruptError(
                f"{ref.uri} does not match its manifest entry: sha256 {digest[:12]}... "
                f"instead of {ref.sha256[:12]}... (damaged on disk?)"
            )

    def _problem(self, ref: CheckpointRef) -> str | None:
        try:
            self.verify(ref)
        except (CheckpointError, FileNotFoundError) as err:
            return str(err)
        return None

    def is_valid(self, ref: CheckpointRef) -> bool:
        """:meth:`verify` as a boolean, logging why a checkpoint is skipped."""
        problem = self._problem(ref)
        if problem is not None:
            logger.warning("skipping checkpoint: %s", problem)
        return problem is None

    def latest(self) -> CheckpointRef | None:
        """The newest valid commit of the newest lineage; while that lineage has none,
        the newest valid one it descends from. ``None`` if there is none."""
        state = self._view()
        ref = self._latest_in(state, lambda entry: self.is_valid(self._ref(entry)))
        if ref is None:
            logger.info("no valid checkpoint in %s", self.root)
        return ref

    def _latest_in(
        self, state: manifest.ManifestState, valid: Callable[[dict], bool]
    ) -> CheckpointRef | None:
        lineage, limit, seen = state.head, math.inf, set()
        while lineage is not None and lineage not in seen:
            seen.add(lineage)
            for entry in reversed(state.entries.values()):
                if entry["lineage"] == lineage and entry["seq"] <= limit and valid(entry):
                    return self._ref(entry)
            parent = (state.lineages.get(lineage) or {}).get("parent") or {}
            if "seq" not in parent or "lineage" not in parent:
                return None
            lineage, limit = int(parent["lineage"]), int(parent["seq"])
        return None

    def best(
        self,
        metric: str,
        mode: Literal["max", "min"] = "max",
        *,
        lineage: int | None = None,
    ) -> CheckpointRef | None:
        """The valid checkpoint with the best finite value of ``metric``, across all
        lineages (or within ``lineage``); ``None`` if none has it. NaN is never best."""
        state = self._view()
        scored = [
            e
            for e in state.entries.values()
            if manifest.finite(e["metrics"].get(metric)) and lineage in (None, e["lineage"])
        ]
        scored.sort(key=lambda e: e["metrics"][metric], reverse=(mode == "max"))
        for entry in scored:
            ref = self._ref(entry)
            if self.is_valid(ref):
                return ref
        return None

    def find(self, uri: str) -> CheckpointRef | None:
        """The committed entry for a file of this store, if the manifest has one."""
        name = self._own_name(uri)
        if name is None:
            return None
        state = self._view()
        seq = state.by_path.get(f"{manifest.CHECKPOINTS}/{name}")
        return self._ref(state.entries[seq]) if seq is not None else None

    def check(self) -> StoreCheck:
        """Every committed checkpoint verified, all from one committed state.

        A run that commits meanwhile may rotate files away; when a file fails, the
        manifest is read again and, if it changed, the check is done on the new state,
        so a checkpoint rotation removed is never reported as damaged.
        """
        problems: dict[tuple, str | None] = {}
        for _ in range(_READ_ATTEMPTS):
            with _manifest_lock(self.root):
                state = self._load()
                key = (state.key, state.problem)
                entries = list(state.entries.values())
            for entry in entries:
                ident = (entry["path"], entry["sha256"], entry["size"])
                if ident not in problems:
                    problems[ident] = self._problem(self._ref(entry))
            failing = any(problems[(e["path"], e["sha256"], e["size"])] for e in entries)
            if not failing:
                break
            with _manifest_lock(self.root):
                again = self._load()
                if (again.key, again.problem) == key:
                    break

        def problem_of(entry: dict) -> str | None:
            return problems[(entry["path"], entry["sha256"], entry["size"])]

        return StoreCheck(
            entries=[
                CheckedEntry(self._ref(e), e["lineage"], e["path"], problem_of(e)) for e in entries
            ],
            lineages=self._lineages_of(state),
            outside=[(o["what"], o["problem"]) for o in state.outside],
            latest=self._latest_in(state, lambda e: problem_of(e) is None),
            problem=state.problem,
            pending=state.pending,
        )

    # changes --------------------------------------------------------------------------

    def _writable(self) -> manifest.ManifestState:
        """The state, with any repair written first (callers hold the thread lock)."""
        state = self._load()
        if state.problem is not None:
            self._set_aside(state.problem)
            state.problem = None
            self._compact(state)
        elif state.pending == "migrate":
            backup = self.root / "manifest.v1.json"
            if not backup.exists():
                io.write_text_atomic(backup, self.manifest_path.read_text(encoding="utf-8"))
            logger.info(
                "migrating %s to format %d (paths relative to the experiment, lineages); "
                "the old file is kept as %s",
                self.manifest_path,
                MANIFEST_VERSION,
                backup.name,
            )
            self._compact(state)
        elif (
            state.pending == "compact"
            or _CACHE.get(self.root) is None
            or _CACHE[self.root].journal_key is None
        ):
            self._compact(state)
        elif state.pending == "truncate":
            cached = _CACHE[self.root]
            with open(self.journal_path, "r+b") as handle:
                handle.truncate(cached.offset)
                os.fsync(handle.fileno())
            cached.snapshot_key = manifest.stat_key(self.manifest_path)
            journal_key = manifest.stat_key(self.journal_path)
            cached.journal_key = journal_key[:2] if journal_key else None
            state.pending = None
        return state

    def _set_aside(self, problem: str) -> None:
        logger.warning("%s; rebuilding it from the checkpoint files", problem)
        stamp = int(time.time())
        for path in (self.manifest_path, self.journal_path):
            if os.path.lexists(path):
                os.replace(path, path.with_name(f"{path.name}.corrupt-{stamp}"))

    def _compact(self, state: manifest.ManifestState) -> None:
        """Write the whole state as a new snapshot, then start an empty journal.

        The snapshot carries a new generation before the journal is replaced: a crash in
        between leaves an older journal, which readers then ignore (the snapshot has
        everything it held).
        """
        state.generation += 1
        state.records = 0
        text = json.dumps(state.snapshot(), indent=1, sort_keys=True, allow_nan=False)
        header = manifest.encode_record(
            {"generation": state.generation, "journal": MANIFEST_VERSION}
        )
        try:
            io.write_text_atomic(self.manifest_path, text)
            io.write_text_atomic(self.journal_path, header.decode())
        except BaseException:
            # What is on disk is consistent either way; forget the state changed in memory.
            _CACHE.pop(self.root, None)
            raise
        journal_key = manifest.stat_key(self.journal_path)
        _CACHE[self.root] = _Cached(
            manifest.stat_key(self.manifest_path),
            journal_key[:2] if journal_key else None,
            len(header),
            state,
        )
        state.pending = None

    def _append(self, state: manifest.ManifestState, record: dict) -> None:
        line = manifest.encode_record(record)
        cached = _CACHE[self.root]
        fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        try:
            manifest.append_record(fd, line)
        except OSError as err:
            # Cut what was written of the line, so that the next record starts clean.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, cached.offset)
            raise CheckpointWriteError(
                f"could not record the commit in {self.journal_path}: {os.strerror(err.errno)}. "
                "Free space and run again; the committed checkpoints are untouched"
            ) from err
        finally:
            os.close(fd)
        state.apply(record)
        cached.offset += len(line)
        if state.records >= max(manifest.COMPACT_AFTER, len(state.entries)):
            self._compact(state)

    def start_lineage(
        self,
        *,
        parent: CheckpointRef | None = None,
        reason: str = "fresh",
        run: str | None = None,
        config_hash: str | None = None,
    ) -> int:
        """Start a new lineage: every later commit goes to it, and auto-resume continues it.

        Call it under the experiment's lock, before the run's first commit: for a fresh
        start (``parent=None``), a branch from an older checkpoint, or a fork that
        continues a checkpoint with a new config (``reason="fork"``, with the new
        ``config_hash``). Nothing is deleted: the other lineages keep their files.

        Args:
            parent: The checkpoint the new lineage continues; one of this store's
                committed checkpoints, or a file elsewhere (recorded, never read here).
            reason: Why it was started (shown by ``baton ckpt list``).
            run: The run that starts it (a flow run id), so a retry of that run can tell
                its own lineage.
            config_hash: The resolved config's hash, for a fork.

        Returns:
            The new lineage's id.
        """
        with _manifest_lock(self.root):
            state = self._writable()
            lineage_id = (state.head or 0) + 1
            record = {
                "id": lineage_id,
                "started": time.time(),
                "reason": reason,
                "parent": self._parent_record(state, parent),
                "run": run,
                "config_hash": config_hash,
            }
            self._append(state, {"op": "lineage", "lineage": record})
        logger.info("started lineage %d of %s (%s)", lineage_id, self.root.name, reason)
        return lineage_id

    def _parent_record(
        self, state: manifest.ManifestState, parent: CheckpointRef | None
    ) -> dict | None:
        if parent is None:
            return None
        name = self._own_name(parent.uri)
        seq = state.by_path.get(f"{manifest.CHECKPOINTS}/{name}") if name else None
        if seq is not None and state.entries[seq]["sha256"] == parent.sha256:
            return {"seq": seq, "lineage": state.entries[seq]["lineage"]}
        return {
            "uri": parent.uri,
            "sha256": parent.sha256,
            "epoch": parent.epoch,
            "iter": parent.iter,
        }

    def target(self, filename: str) -> Path:
        """Where a checkpoint saved under the bare name ``filename`` goes: its name in the
        newest lineage (``L2-epoch_0003.pth`` in lineage 2).

        Raises:
            CheckpointError: That file is another lineage's committed checkpoint.
        """
        with _manifest_lock(self.root):
            state = self._load()
            lineage = state.head or 1
            prefixed, _ = CheckpointName.split_lineage(filename)
            name = filename if prefixed != 1 else CheckpointName.in_lineage(filename, lineage)
            path = self.path_for(name)
            self._check_target(state, name, lineage)
        return path

    def check_target(self, path: str | os.PathLike) -> None:
        """Refuse to write over a file that another lineage committed.

        Raises:
            CheckpointError: ``path`` is another lineage's committed checkpoint.
        """
        name = self._own_name(str(path))
        if name is None:
            return
        with _manifest_lock(self.root):
            state = self._load()
            self._check_target(state, name, state.head or 1)

    def _check_target(self, state: manifest.ManifestState, name: str, lineage: int) -> None:
        seq = state.by_path.get(f"{manifest.CHECKPOINTS}/{name}")
        if seq is not None and state.entries[seq]["lineage"] != lineage:
            raise CheckpointError(
                f"{name} is a committed checkpoint of lineage {state.entries[seq]['lineage']}; "
                f"lineage {lineage} does not overwrite it. Save under another name"
            )

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
        """Record a fully written checkpoint in the newest lineage, then apply retention.

        An entry for the same file is replaced (a checkpoint written again at the same
        position). Files dropped by retention are deleted after the commit is durable.

        Raises:
            CheckpointOutsideError: ``uri`` is not a file inside this store's folder.
            CheckpointError: The file is another lineage's committed checkpoint.
        """
        name = self._own_name(uri)
        if name is None:
            raise CheckpointOutsideError(
                f"{uri} is not inside {self.checkpoint_dir}; only the experiment's own "
                "checkpoints are committed to its manifest"
            )
        with _manifest_lock(self.root):
            state = self._writable()
            if state.head is None:
                first = {"id": 1, "started": time.time(), "reason": "first", "parent": None}
                self._append(state, {"op": "lineage", "lineage": first})
            lineage = state.head
            self._check_target(state, name, lineage)
            entry = {
                "seq": state.next_seq,
                "path": f"{manifest.CHECKPOINTS}/{name}",
                "lineage": lineage,
                "epoch": int(epoch),
                "iter": int(iter),
                "size": int(size),
                "sha256": sha256,
                "metrics": manifest.clean_metrics(metrics),
                "created": time.time(),
            }
            drop = self._rotation_drops(state, entry)
            dropped = [state.entries[seq]["path"] for seq in drop]
            self._append(state, {"op": "commit", "entry": entry, "drop": drop})
            self._delete_own([PurePosixPath(p).name for p in dropped])
            return self._ref(entry)

    def _rotation_drops(self, state: manifest.ManifestState, new: dict) -> list[int]:
        policy = self.retention
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

    def _delete_own(self, names: list[str]) -> None:
        if not names:
            return
        dir_fd = self._open_checkpoint_dir()
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
                logger.info("rotation removed %s", self.checkpoint_dir / name)
        finally:
            os.close(dir_fd)

    def rebuild(self) -> list[CheckpointRef]:
        """Rebuild the manifest from the checkpoint files that load safely.

        The unreadable manifest is kept beside it as ``manifest.json.corrupt-<time>``
        (the journal likewise). Each file is loaded (``weights_only``) to check that it is
        a whole checkpoint; its position and metrics come from its ``meta``, its lineage
        from its name.
        """
        with _manifest_lock(self.root):
            state = self._state_from_files("rebuild requested")
            self._set_aside("rebuild requested")
            state.problem = None
            self._compact(state)
        return self.list()

    def repair(self) -> None:
        """Write what a reader found pending: migrate a manifest of the first format,
        cut a torn journal line, rebuild an unreadable manifest. Called by :meth:`lock`."""
        with _manifest_lock(self.root):
            state = self._load()
            if state.problem is not None or state.pending is not None:
                self._writable()

    def _remove_stale_temporaries(self) -> None:
        """Delete temporary files a killed writer left (only called under the lock, before
        this run writes anything, so none of them belongs to a live write)."""
        for folder in (self.root, self.checkpoint_dir):
            if folder.is_dir() and not folder.is_symlink():
                for leftover in folder.glob(".*.tmp"):
                    if leftover.is_file() and not leftover.is_symlink():
                        leftover.unlink(missing_ok=True)
                        logger.info("removed %s, left by an interrupted write", leftover.name)

    @contextlib.contextmanager
    def lock(self, *, wait: bool = False) -> Iterator[None]:
        """Hold the experiment's exclusive lock (an ``flock`` on ``root/.lock``).

        Taking it removes what killed writers left and repairs the manifest (see
        :meth:`repair`), so that every reader after it sees a clean state.

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
            try:
                self._remove_stale_temporaries()
                self.repair()
                yield
            finally:
                handle.seek(0)
                handle.truncate()
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class _Changed(Exception):
    """The manifest changed while being read; read it again."""
