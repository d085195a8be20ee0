"""An experiment's committed state: its manifest files read (cached per process), repaired,
appended to and compacted.

**Commit cost.** A commit appends one checksummed line to the journal and fsyncs it, so
its cost does not grow with the history; the journal is folded into a new snapshot
(written atomically) once it holds more records than the snapshot has entries (the
format: :mod:`baton.checkpoint.manifest`). A crash leaves at worst a torn last line,
which readers ignore and the next writer cuts off. Manifests of the first format (one
JSON file with absolute URIs) are read as they are and rewritten in this format by the
first writer (a run holding the lock). Readers never write: repairs belong to runs that
hold the experiment's lock.

Every function here expects its caller to hold :func:`manifest_lock` for the folder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from baton.checkpoint import io, manifest
from baton.checkpoint.files import ExperimentFiles
from baton.checkpoint.manifest import MANIFEST_VERSION
from baton.checkpoint.ref import CheckpointName
from baton.errors import (
    CheckpointError,
    CheckpointWriteError,
    ManifestReadError,
    ManifestVersionError,
)

logger = logging.getLogger(__name__)

READ_ATTEMPTS = 50
"""How often a read is tried again while another process keeps replacing the files."""

# Manifest updates are read-modify-write; a background save commits from another thread.
_MANIFEST_LOCKS: dict[Path, threading.Lock] = {}
_MANIFEST_LOCKS_GUARD = threading.Lock()


def manifest_lock(root: Path) -> threading.Lock:
    """The thread lock this process holds while it reads or changes ``root``'s manifest."""
    with _MANIFEST_LOCKS_GUARD:
        return _MANIFEST_LOCKS.setdefault(root, threading.Lock())


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


class _Changed(Exception):
    """The manifest changed while being read; read it again."""


# Errors of opening a manifest file that say what the file is (a link, a socket, a device
# without a driver): damage, rebuilt under the lock. Every other OSError is a fault of the
# moment (EIO, EACCES, ENOMEM...): rebuilding then would lose every lineage's name and
# parent, so it is raised as ManifestReadError and retried instead.
_NOT_A_REGULAR_FILE = frozenset({errno.ELOOP, errno.ENXIO, errno.ENODEV})


def _read_manifest_file(path: Path) -> bytes:
    """The bytes of the snapshot or the journal.

    Raises:
        _Changed: The file went away after it was seen (replaced by a compaction).
        ManifestReadError: It could not be read now; nothing was changed.
        OSError: It is not a regular file (damage, for the caller to rebuild).
    """
    try:
        return manifest.read_regular_file(path)
    except FileNotFoundError:
        raise _Changed from None
    except OSError as err:
        if err.errno in _NOT_A_REGULAR_FILE:
            raise
        raise ManifestReadError(
            f"{path} could not be read ({err.strerror or err}); it was left as it is and "
            "the run may be retried; if this persists, check the disk and the file's "
            "permissions"
        ) from err


# reading ------------------------------------------------------------------------------


def load(files: ExperimentFiles) -> manifest.ManifestState:
    """The committed state. Never writes."""
    for _ in range(READ_ATTEMPTS):
        snapshot_key = manifest.stat_key(files.manifest_path)
        journal_key = manifest.stat_key(files.journal_path)
        cached = _CACHE.get(files.root)
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
            if _read_new_records(files, cached):
                return cached.state
            _CACHE.pop(files.root, None)  # anything odd: read everything again
        try:
            state, offset, journal_id = _read_files(files)
        except _Changed:
            continue
        if state.problem is not None:
            journal_id = journal_key[:2] if journal_key else None
        if manifest.stat_key(files.manifest_path) != snapshot_key:
            continue  # replaced while we read the journal: read again
        _CACHE[files.root] = _Cached(snapshot_key, journal_id, offset, state)
        return state
    state = state_from_files(files, f"{files.manifest_path} kept changing while being read")
    return state


def _read_new_records(files: ExperimentFiles, cached: _Cached) -> bool:
    """Apply the journal lines written since ``cached`` was read; False when they
    cannot be read as intact records (then the caller reads everything again)."""
    try:
        data = manifest.read_regular_file(files.journal_path, cached.offset)
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


def _read_files(files: ExperimentFiles) -> tuple[manifest.ManifestState, int, tuple | None]:
    """The snapshot with its journal applied, the journal bytes used and the journal's
    ``(dev, ino)``; a state rebuilt from the checkpoint files when they cannot be read.

    Raises:
        _Changed: The files were compacted while being read.
    """
    try:
        text = _read_manifest_file(files.manifest_path) if files.manifest_path.exists() else None
        if text is None and not os.path.lexists(files.journal_path):
            empty = manifest.ManifestState()
            empty.pending = "compact"  # the first writer creates both files
            return empty, 0, None
        if text is None:
            raise ValueError("there is a journal but no manifest.json")
        state = manifest.read_snapshot(json.loads(text))
    except (ManifestVersionError, ManifestReadError):
        raise
    except (OSError, ValueError, KeyError, TypeError, CheckpointError) as err:
        return state_from_files(files, f"{files.manifest_path} is unreadable ({err})"), 0, None
    if state.pending == "migrate":
        return state, 0, None
    try:
        st = os.stat(files.journal_path, follow_symlinks=False)
    except FileNotFoundError:
        state.pending = "compact"
        return state, 0, None
    try:
        data = _read_manifest_file(files.journal_path)
    except ManifestReadError:
        raise
    except (OSError, CheckpointError) as err:
        return state_from_files(files, f"{files.journal_path} is unreadable ({err})"), 0, None
    return _apply_journal(files, state, data, (st.st_dev, st.st_ino))


def _apply_journal(
    files: ExperimentFiles, state: manifest.ManifestState, data: bytes, journal_id: tuple
) -> tuple[manifest.ManifestState, int, tuple | None]:
    """:func:`_read_files` once the snapshot and the journal's bytes are read."""
    records, offset, problem = manifest.parse_journal(data)
    header = records[0] if records else None
    if header is None or "generation" not in header:
        if data:
            problem = problem or "the journal has no header line"
        else:
            state.pending = "compact"
            return state, 0, None
    if problem is not None:
        return state_from_files(files, f"{files.journal_path}: {problem}"), 0, None
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
        return state_from_files(files, f"{files.journal_path}: a bad record ({err})"), 0, None
    if offset < len(data):
        state.pending = "truncate"
    return state, offset, journal_id


def state_from_files(files: ExperimentFiles, problem: str) -> manifest.ManifestState:
    """A state rebuilt in memory from the checkpoint files that load safely."""
    logger.warning("manifest of %s: %s; using the checkpoint files instead", files.root, problem)
    state = manifest.ManifestState()
    state.problem = problem
    found: list[tuple[int, int, str, dict]] = []
    for name in files.own_file_names():
        parsed = CheckpointName.parse(name)
        if parsed is None:
            continue
        try:
            size, digest = files.hash_own(name)
            checkpoint = io.load(str(files.checkpoint_dir / name))
            meta = checkpoint.get("meta") or {}
            entry = {
                "path": f"{manifest.CHECKPOINTS}/{name}",
                "lineage": parsed.lineage,
                "epoch": int(meta["epoch"]),
                "iter": int(meta["iter"]),
                "size": size,
                "sha256": digest,
                "metrics": manifest.clean_metrics(meta.get("metrics")),
                "created": os.stat(files.checkpoint_dir / name).st_mtime,
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


# writing ------------------------------------------------------------------------------


def writable(files: ExperimentFiles) -> manifest.ManifestState:
    """The state, with any repair written first."""
    state = load(files)
    if state.problem is not None:
        set_aside(files, state.problem)
        state.problem = None
        compact(files, state)
    elif state.pending == "migrate":
        backup = files.root / "manifest.v1.json"
        if not backup.exists():
            io.write_text_atomic(backup, files.manifest_path.read_text(encoding="utf-8"))
        logger.info(
            "migrating %s to format %d (paths relative to the experiment, lineages); "
            "the old file is kept as %s",
            files.manifest_path,
            MANIFEST_VERSION,
            backup.name,
        )
        compact(files, state)
    elif (
        state.pending == "compact"
        or _CACHE.get(files.root) is None
        or _CACHE[files.root].journal_key is None
    ):
        compact(files, state)
    elif state.pending == "truncate":
        _truncate(files, state)
    return state


def _truncate(files: ExperimentFiles, state: manifest.ManifestState) -> None:
    """Cut the journal's torn last line."""
    cached = _CACHE[files.root]
    with open(files.journal_path, "r+b") as handle:
        handle.truncate(cached.offset)
        os.fsync(handle.fileno())
    cached.snapshot_key = manifest.stat_key(files.manifest_path)
    journal_key = manifest.stat_key(files.journal_path)
    cached.journal_key = journal_key[:2] if journal_key else None
    state.pending = None


def set_aside(files: ExperimentFiles, problem: str) -> None:
    """Keep the unreadable manifest files beside them as ``<name>.corrupt-<time>``."""
    logger.warning("%s; rebuilding it from the checkpoint files", problem)
    stamp = int(time.time())
    for path in (files.manifest_path, files.journal_path):
        if os.path.lexists(path):
            os.replace(path, path.with_name(f"{path.name}.corrupt-{stamp}"))


def compact(files: ExperimentFiles, state: manifest.ManifestState) -> None:
    """Write the whole state as a new snapshot, then start an empty journal.

    The snapshot carries a new generation before the journal is replaced: a crash in
    between leaves an older journal, which readers then ignore (the snapshot has
    everything it held).
    """
    state.generation += 1
    state.records = 0
    text = json.dumps(state.snapshot(), indent=1, sort_keys=True, allow_nan=False)
    header = manifest.encode_record({"generation": state.generation, "journal": MANIFEST_VERSION})
    try:
        io.write_text_atomic(files.manifest_path, text)
        io.write_text_atomic(files.journal_path, header.decode())
    except BaseException:
        # What is on disk is consistent either way; forget the state changed in memory.
        _CACHE.pop(files.root, None)
        raise
    journal_key = manifest.stat_key(files.journal_path)
    _CACHE[files.root] = _Cached(
        manifest.stat_key(files.manifest_path),
        journal_key[:2] if journal_key else None,
        len(header),
        state,
    )
    state.pending = None


def append(files: ExperimentFiles, state: manifest.ManifestState, record: dict) -> None:
    """Record one change durably in the journal (``state`` from :func:`writable`), and
    fold the journal into a new snapshot once it is long enough.

    Raises:
        CheckpointWriteError: The record could not be written (nothing was recorded).
    """
    line = manifest.encode_record(record)
    cached = _CACHE[files.root]
    fd = os.open(files.journal_path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
    try:
        manifest.append_record(fd, line)
    except OSError as err:
        # Cut what was written of the line, so that the next record starts clean.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, cached.offset)
        raise CheckpointWriteError(
            f"could not record the commit in {files.journal_path}: {os.strerror(err.errno)}. "
            "Free space and run again; the committed checkpoints are untouched"
        ) from err
    finally:
        os.close(fd)
    state.apply(record)
    cached.offset += len(line)
    if state.records >= max(manifest.COMPACT_AFTER, len(state.entries)):
        try:
            compact(files, state)
        except CheckpointWriteError as err:
            # The commit is durable in the journal already; the next writer compacts.
            logger.warning("%s; the journal keeps every commit, compaction waits", err)
