"""Writing a checkpoint in the background, so training goes on while the bytes reach the
disk: a thread writes a copy of a small state; a forked child writes a copy-on-write
snapshot of a large one (without ``fork``, and for remote URIs, a thread writes a copy)."""

import contextlib
import copy
import json
import os
import signal
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from baton.checkpoint.atomic import _only_cpu_tensors, _remove_temporaries_of, save
from baton.checkpoint.location import is_local, local_path
from baton.errors import CheckpointError
from baton.lifetime import end_with_parent
from baton.trust.quotas import estimate_bytes

# A state up to this size is copied and written by a thread: copying it costs less than a
# fork, which copies the page tables of the whole process (torch and the data included), and
# then, while the child writes, every page that training changes. The 2.4 MB state of
# benchmarks/bench_overhead.py in its 330 MB training process: training stopped 10-12 ms for
# a fork, 3 ms for the copy (both with the state's capture); a copy of 64 MiB takes 7 ms.
# Above this size the fork is the shorter stall, and its child needs no second copy of the
# state in memory.
COPY_BELOW_BYTES = 64 * 2**20


def _snapshot(obj: dict) -> dict:
    """A copy of ``obj`` that training cannot change, written as ``torch.save`` writes
    ``obj``: ``copy.deepcopy`` keeps what pickling keeps (one storage for tied weights and
    views, an object referenced twice, parameters, a state dict's ``_metadata``). A copy on
    an accelerator is waited for, so that the writing thread reads it whole."""
    snapshot = copy.deepcopy(obj)
    if not _only_cpu_tensors(snapshot):
        torch.accelerator.synchronize()
    return snapshot


def _save_in_child(obj: dict, uri: str) -> Future:
    """Fork; the child writes ``obj`` from its copy-on-write view of memory and reports
    ``(size, sha256)`` through a pipe; a thread of the parent waits for it."""
    future: Future = Future()
    read_fd, write_fd = os.pipe()
    parent = os.getpid()
    from_main_thread = threading.current_thread() is threading.main_thread()
    pid = os.fork()
    if pid == 0:  # the child: write, report, leave without running the parent's cleanup
        code = 1
        try:
            os.close(read_fd)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            # Only the parent commits what is written: a writer whose parent ended (the
            # OOM killer) writes for nobody, and must not live on alone.
            end_with_parent(parent, from_main_thread=from_main_thread, exit_code=1)
            size, digest = save(obj, uri)
            os.write(write_fd, json.dumps({"size": size, "sha256": digest}).encode())
            code = 0
        except BaseException as err:
            with contextlib.suppress(BaseException):
                os.write(write_fd, json.dumps({"error": f"{type(err).__name__}: {err}"}).encode())
        finally:
            os._exit(code)
    os.close(write_fd)

    def wait() -> None:
        chunks = []
        while chunk := os.read(read_fd, 65536):
            chunks.append(chunk)
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
        try:
            report = json.loads(b"".join(chunks) or b"{}")
        except ValueError:
            report = {}
        code = os.waitstatus_to_exitcode(status)
        if code == 0 and "sha256" in report:
            future.set_result((report["size"], report["sha256"]))
            return
        # A writer that was killed (the OOM killer, a signal) ran no cleanup of its own:
        # its temporary file would stay until the experiment is next locked.
        _remove_temporaries_of(local_path(uri))
        if report.get("error"):
            reason = report["error"]
        elif code < 0:
            reason = f"the writer process was killed by signal {-code}"
        else:
            reason = f"the writer process exited with status {code}"
        future.set_exception(CheckpointError(f"background save of {uri} failed: {reason}"))

    threading.Thread(target=wait, name="baton-save-waiter", daemon=True).start()
    return future


def save_in_background(obj: dict, uri: str) -> Future:
    """Start writing ``obj`` to ``uri`` and return a future of ``(size, sha256)``.

    The caller may change ``obj`` and its tensors as soon as this returns. A state of up
    to :data:`COPY_BELOW_BYTES` is copied and a thread writes the copy; a larger one, on
    POSIX systems and to a local file, is written by a forked child from its copy-on-write
    view of memory (the call costs a fork); elsewhere a thread writes a copy.
    """
    can_fork = hasattr(os, "fork") and is_local(uri)
    if can_fork and estimate_bytes(obj) > COPY_BELOW_BYTES:
        return _save_in_child(obj, uri)
    try:
        snapshot = _snapshot(obj)
    except Exception as err:  # something pickle takes and deepcopy does not (a subclass)
        if can_fork:
            return _save_in_child(obj, uri)
        failed: Future = Future()
        failed.set_exception(
            CheckpointError(f"background save of {uri} failed: could not copy the state: {err}")
        )
        return failed
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="baton-save")
    future = pool.submit(_save_copy, snapshot, uri)
    pool.shutdown(wait=False)
    return future


def _save_copy(snapshot: dict, uri: str) -> tuple[int, str]:
    """The thread's write, failing as a child's does (its temporary file already removed)."""
    try:
        return save(snapshot, uri)
    except Exception as err:
        raise CheckpointError(
            f"background save of {uri} failed: {type(err).__name__}: {err}"
        ) from err
