"""The experiment lock: one process at a time trains an experiment (an ``flock``)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

from baton.checkpoint.files import ExperimentFiles
from baton.errors import ExperimentLockedError


@contextlib.contextmanager
def experiment_lock(files: ExperimentFiles, *, wait: bool = False) -> Iterator[None]:
    """Hold the exclusive ``flock`` on ``root/.lock``, with this process's pid written in
    it so that a refused run can say who holds it.

    Args:
        files: The experiment's folder (created if missing).
        wait: Block until the lock is free instead of failing at once.

    Raises:
        ExperimentLockedError: Another process holds it and ``wait`` is False.
    """
    files.root.mkdir(parents=True, exist_ok=True)
    with open(files.lock_path, "a+") as handle:
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
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
