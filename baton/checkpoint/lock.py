"""The experiment lock: one process at a time trains an experiment (an ``flock``).

The lock also remembers which folder it was taken in: its identity (device and inode),
not its path. A folder moved (``mv``) or deleted while its run trains keeps the lock (an
``flock`` follows the file, not the name), but the path no longer leads to it, and a run
that went on writing by path would create a second, partial experiment there. Every
writer of the run checks the identity first (:func:`check_in_place`, one ``stat``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from baton.checkpoint.files import ExperimentFiles
from baton.errors import ExperimentLockedError, ExperimentMovedError, ExperimentNotWritableError

# errno values that say the folder cannot be written, now or on a retry
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


@dataclass(frozen=True)
class _Held:
    """A lock this process holds: the folder's identity when it was taken, and the lock
    file's descriptor (which still names the folder where it is now)."""

    identity: tuple[int, int]
    fd: int


# Per process, the experiment folders whose lock it holds, by the path they were locked at.
# The tasks of one flow run reach the folder through Experiment objects of their own, so
# the identity is kept here, by path, and not on one of them.
_HELD: dict[Path, _Held] = {}
_HELD_GUARD = threading.Lock()


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_dev, st.st_ino)


def check_in_place(root: Path) -> None:
    """Refuse to write into ``root`` when this process holds its lock and the folder at
    ``root`` is no longer the one it locked (moved, deleted, or replaced by another).
    Nothing is checked for a folder this process does not hold (the strategy used as a
    library, a reader).

    Raises:
        ExperimentMovedError: Saying what happened and how to resume the experiment.
    """
    held = _HELD.get(root)
    if held is None or _identity(root) == held.identity:
        return
    raise ExperimentMovedError(_moved_message(root, held))


def in_place(root: Path) -> bool:
    """:func:`check_in_place` as a boolean."""
    held = _HELD.get(root)
    return held is None or _identity(root) == held.identity


def _moved_message(root: Path, held: _Held) -> str:
    where = _where_now(held.fd)
    if where is None:
        happened = "was deleted (or moved out of sight)"
        advice = (
            "if it was moved, resume it where it is now with its new work_dir and "
            "experiment_name (baton run CONFIG --set work_dir=NEW_PARENT ...); if it was "
            "deleted, a new run starts the experiment afresh"
        )
    else:
        happened = f"was moved to {str(where)!r}"
        advice = (
            f"resume it where it is now: baton run CONFIG --set work_dir={where.parent} "
            f"--set experiment_name={where.name} (it continues from its last committed "
            "checkpoint)"
        )
    return (
        f"the experiment folder {str(root)!r} {happened} while this run trained it; the run "
        f"stops here and writes nothing at {str(root)!r}. To continue, {advice}"
    )


def _where_now(fd: int) -> Path | None:
    """Where the held lock file's folder is now (Linux names an open file's current path
    in /proc); ``None`` when it was deleted or the system cannot tell."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    if target.endswith(" (deleted)") or not target.startswith("/"):
        return None
    return Path(target).parent


@contextlib.contextmanager
def _opened_lock_file(files: ExperimentFiles) -> Iterator:
    try:
        files.root.mkdir(parents=True, exist_ok=True)
        handle = open(files.lock_path, "a+")  # noqa: SIM115 (closed below)
    except OSError as err:
        if err.errno not in _NOT_WRITABLE:
            raise
        raise ExperimentNotWritableError(
            f"experiment folder {str(files.root)!r} cannot be written "
            f"({os.strerror(err.errno)}): a run writes its lock, checkpoints and logs there, "
            "so nothing was started. Make the folder writable for this user (or remount its "
            "disk read-write), or train elsewhere with another work_dir"
        ) from err
    with handle:
        yield handle


@contextlib.contextmanager
def experiment_lock(files: ExperimentFiles, *, wait: bool = False) -> Iterator[None]:
    """Hold the exclusive ``flock`` on ``root/.lock``, with this process's pid written in
    it so that a refused run can say who holds it, and the folder's identity remembered
    for :func:`check_in_place`.

    Args:
        files: The experiment's folder (created if missing).
        wait: Block until the lock is free instead of failing at once.

    Raises:
        ExperimentLockedError: Another process holds it and ``wait`` is False.
        ExperimentNotWritableError: The folder (or the lock file) cannot be written.
    """
    with _opened_lock_file(files) as handle:
        flags = fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(handle.fileno(), flags)
        except BlockingIOError as err:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ExperimentLockedError(
                f"experiment {files.root.name!r} is being trained by {holder}; wait for it "
                "to finish (or stop it) before starting another run"
            ) from err
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        identity = _identity(files.root)
        with _HELD_GUARD:
            if identity is not None:
                _HELD[files.root] = _Held(identity, handle.fileno())
        try:
            yield
        finally:
            with _HELD_GUARD:
                _HELD.pop(files.root, None)
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
