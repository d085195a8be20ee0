"""A child process's life tied to its parent's (Linux): the processes baton starts (ranks,
the training process, a background checkpoint writer, the embedded server) end with the
process that started them, however that one ends (the OOM killer, a SIGKILL)."""

import contextlib
import ctypes
import os
import signal
import threading
import time

PR_SET_PDEATHSIG = 1
# How often a child watching its parent looks whether it is still there.
PARENT_CHECK_S = 0.5


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Have the kernel send ``signum`` to this process when its parent dies (Linux;
    elsewhere nothing). The signal follows the parent's *thread* that forked: see
    :func:`end_with_parent` for a child forked from another thread."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)


def end_with_parent(parent: int, *, from_main_thread: bool, exit_code: int) -> None:
    """In a child forked from process ``parent``: end with it. A SIGKILL from the kernel
    where the fork came from the parent's main thread (from another thread, the signal
    would come when that thread ends, with the parent alive), and in every case a thread
    that exits with ``exit_code`` within ``PARENT_CHECK_S`` of the parent's end (at once
    if it ended before this call)."""
    if from_main_thread:
        die_with_parent(signal.SIGKILL)
    if os.getppid() != parent:  # it ended before the setting took
        os._exit(exit_code)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        os._exit(exit_code)

    threading.Thread(target=watch, name="baton-parent-watch", daemon=True).start()
