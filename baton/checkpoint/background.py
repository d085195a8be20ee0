"""Writing a checkpoint in the background: a forked child writes a copy-on-write snapshot
(or, without ``fork`` and for remote URIs, a thread writes a clone), so training goes on
while the bytes reach the disk."""

import contextlib
import json
import os
import signal
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from baton.checkpoint.atomic import _remove_temporaries_of, save
from baton.checkpoint.location import is_local, local_path
from baton.errors import CheckpointError
from baton.lifetime import end_with_parent


def _clone_tensors(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return type(value)((k, _clone_tensors(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_clone_tensors(v) for v in value)
    return value


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

    The caller may change its tensors as soon as this returns. On POSIX systems a forked
    child writes a copy-on-write snapshot (the call costs a fork); elsewhere, and for
    remote URIs, the tensors are cloned and a thread writes the clone.
    """
    if hasattr(os, "fork") and is_local(uri):
        return _save_in_child(obj, uri)
    snapshot = _clone_tensors(obj)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="baton-save")
    future = pool.submit(save, snapshot, uri)
    pool.shutdown(wait=False)
    return future
