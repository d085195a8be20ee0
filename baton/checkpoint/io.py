"""How checkpoints reach the disk and come back: atomic writes, checksums, safe loading.

Writes go to a temporary file in the target's directory, are flushed and fsynced, renamed
over the target, and the directory is fsynced, so a crash leaves either the old file or the
new one, never half of one. The sha256 is computed from the bytes as they are written, not
in a second pass over the file.

Loading uses ``torch.load(weights_only=True)``: a pickle that would run code is refused.
Files from a trusted source that need full unpickling (old mmengine checkpoints holding
arbitrary objects) load only inside :func:`trusted_loading`, an explicit opt-in.
"""

import collections
import contextlib
import contextvars
import ctypes
import ctypes.util
import errno
import glob
import hashlib
import io
import json
import logging
import os
import pickle
import signal
import stat
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import fsspec
import torch

from baton.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    UnsafeCheckpointError,
)

logger = logging.getLogger(__name__)

# The only non-primitive globals our loader accepts. Our own files hold nothing but
# dicts, lists, tuples, numbers, strings and tensors; mmengine's schedulers store
# MultiStepLR milestones as a Counter.
SAFE_GLOBALS: tuple[Any, ...] = (collections.Counter,)

# errno values that mean "the disk cannot take this file"
_SPACE_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS}

_TRUSTED = contextvars.ContextVar("baton_trusted_loading", default=False)
# (uri, size, sha256) the next load of that uri must match (see expect_bytes).
_EXPECTED: contextvars.ContextVar[tuple[str, int, str] | None] = contextvars.ContextVar(
    "baton_expected_bytes", default=None
)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by the owner only; checkpoints get the usual mode.
_FILE_MODE = 0o666 & ~_current_umask()

MapLocation = str | torch.device | Callable | dict | None


@contextlib.contextmanager
def expect_bytes(uri: str, size: int, sha256: str) -> Iterator[None]:
    """Within the block, loading ``uri`` checks that its bytes have this size and sha256
    (a checkpoint reference's), on the very bytes it loads: a file replaced or damaged
    since the reference was taken is refused, not loaded.

    Raises (from the load):
        CheckpointCorruptError: The bytes differ.
    """
    token = _EXPECTED.set((uri, size, sha256))
    try:
        yield
    finally:
        _EXPECTED.reset(token)


def _check_expected(uri: str, handle: BinaryIO) -> None:
    """Hash what ``handle`` holds against the expectation for ``uri``; rewind it."""
    expected = _EXPECTED.get()
    if expected is None or expected[0] != uri:
        return
    digest, size = hashlib.sha256(), 0
    while chunk := handle.read(8 << 20):
        digest.update(chunk)
        size += len(chunk)
    handle.seek(0)
    if (size, digest.hexdigest()) != expected[1:]:
        raise CheckpointCorruptError(
            f"{uri!r} is not the checkpoint its reference names (size {size} vs "
            f"{expected[1]}, sha256 {digest.hexdigest()[:12]} vs {expected[2][:12]}): it was "
            "replaced or damaged since; resume from another checkpoint"
        )


@contextlib.contextmanager
def trusted_loading() -> Iterator[None]:
    """Allow full unpickling of checkpoints loaded inside this block.

    Only for files whose origin you trust: unpickling can run arbitrary code. Use it
    for legacy checkpoints (for example mmengine files holding custom Python objects)
    that ``weights_only`` loading refuses::

        with baton.trusted_loading():
            strategy.resume("old_mmengine_run/epoch_12.pth")
    """
    token = _TRUSTED.set(True)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def is_local(uri: str) -> bool:
    """True for plain paths and ``file://`` URIs."""
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> Path:
    """The filesystem path of a local URI (``~`` expanded, ``file://`` stripped)."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return Path(uri).expanduser()


def _load_sync_file_range() -> Callable[[int], None] | None:
    """``sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)``: start writeback, don't wait.

    Linux only; elsewhere checkpoints are written back by the final fsync alone.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        func = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    return lambda fd: func(fd, 0, 0, 2)


_start_writeback = _load_sync_file_range()


class _HashingWriter(io.RawIOBase):
    """A write-only stream that forwards bytes to a file and hashes them on the way.

    The sha256 is computed by a helper thread, in order, while this thread goes on
    writing (``hashlib`` and file writes release the GIL): large writes are cut into
    pieces that are written here and hashed there. With ``borrowed_buffers_live`` the
    caller promises that large buffers stay valid until :meth:`close` (true for CPU
    tensors being saved, which are the storages of the object itself), so a write
    returns without waiting for its hash; otherwise every write waits for its pieces.
    Small writes are copied, so their buffers may be reused at once. With ``fd``, disk
    writeback starts every ``WRITEBACK_EVERY`` bytes, so the disk works while the hash
    is computed and the final fsync has little left to do.
    """

    PIECE = 8 << 20
    WRITEBACK_EVERY = 64 << 20

    def __init__(self, raw: BinaryIO, fd: int | None = None, borrowed_buffers_live: bool = False):
        super().__init__()
        self._raw = raw
        self._fd = fd if _start_writeback is not None else None
        self._defer = borrowed_buffers_live
        self._digest = hashlib.sha256()
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="baton-sha256")
        self._pending = None
        self._unflushed = 0
        self.size = 0
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        try:
            return self._write(data)
        except OSError as err:
            # torch.save re-raises errors from write() as RuntimeError; keep the original.
            self.error = err
            raise

    def _write(self, data) -> int:
        view = memoryview(data).cast("B")
        length = len(view)
        if length < self.PIECE:
            self._pending = self._hasher.submit(self._digest.update, bytes(view))
            self._raw.write(view)
        else:
            for offset in range(0, length, self.PIECE):
                piece = view[offset : offset + self.PIECE]
                self._pending = self._hasher.submit(self._digest.update, piece)  # FIFO
                self._raw.write(piece)
                self._writeback(len(piece))
            if not self._defer:
                self._pending.result()
        self.size += length
        return length

    def _writeback(self, written: int) -> None:
        if self._fd is None:
            return
        self._unflushed += written
        if self._unflushed >= self.WRITEBACK_EVERY:
            self._unflushed = 0
            _start_writeback(self._fd)

    def hexdigest(self) -> str:
        """The sha256 of everything written (waits for the helper thread)."""
        if self._pending is not None:
            self._pending.result()
        return self._digest.hexdigest()

    def flush(self) -> None:
        self._raw.flush()

    def close(self) -> None:
        self._hasher.shutdown(wait=True)
        super().close()


def _only_cpu_tensors(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.device.type == "cpu"
    if isinstance(obj, dict):
        return all(_only_cpu_tensors(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_only_cpu_tensors(v) for v in obj)
    return True


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename inside it survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_prefix(target: Path) -> str:
    return f".{target.name}."


def _remove_temporaries_of(target: Path) -> None:
    """Delete the temporary files of writes to ``target`` (its writer is known dead)."""
    if target.parent.is_dir():
        for leftover in target.parent.glob(f"{glob.escape(_temporary_prefix(target))}*.tmp"):
            leftover.unlink(missing_ok=True)
            logger.info("removed %s, left by a writer that did not finish", leftover.name)


@contextlib.contextmanager
def _atomic_local_file(target: Path) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``target``; on success fsync and rename it over."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=_temporary_prefix(target), suffix=".tmp", dir=target.parent
    )
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save(obj: dict, uri: str) -> tuple[int, str]:
    """Write ``obj`` with ``torch.save`` atomically; return ``(size, sha256)`` of the bytes.

    Local targets are written through a temporary file and a rename. Other fsspec URIs
    are uploaded in one put, which object stores apply atomically.
    """
    if is_local(uri):
        # torch.save hands CPU storages to write() as they are; other devices go through
        # temporary copies, so their pieces must be hashed before write() returns.
        live = _only_cpu_tensors(obj)
        writer = None
        try:
            with (
                _atomic_local_file(local_path(uri)) as handle,
                _HashingWriter(handle, handle.fileno(), borrowed_buffers_live=live) as writer,
            ):
                torch.save(obj, writer)
                return writer.size, writer.hexdigest()
        except (OSError, RuntimeError) as err:
            cause = writer.error if writer is not None and writer.error else err
            if isinstance(cause, OSError) and cause.errno in _SPACE_ERRORS:
                raise CheckpointWriteError(
                    f"could not write checkpoint {uri}: {os.strerror(cause.errno)}. Free space "
                    "(or lower checkpoint.keep_last) and run again; the previous checkpoints "
                    "and the manifest are untouched"
                ) from cause
            raise
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    fs, path = fsspec.core.url_to_fs(uri)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, data)
    return len(data), hashlib.sha256(data).hexdigest()


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
    pid = os.fork()
    if pid == 0:  # the child: write, report, leave without running the parent's cleanup
        code = 1
        try:
            os.close(read_fd)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
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


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (used for manifests and sidecars)."""
    try:
        with _atomic_local_file(path) as handle:
            handle.write(text.encode("utf-8"))
    except OSError as err:
        if err.errno in _SPACE_ERRORS:
            raise CheckpointWriteError(
                f"could not write {path}: {os.strerror(err.errno)}; the previous version is "
                "untouched. Free space and run again"
            ) from err
        raise


def sha256_of(uri: str, chunk_size: int = 8 << 20) -> tuple[int, str]:
    """Size and sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open_binary(uri) as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def open_binary(uri: str) -> BinaryIO:
    """Open a local path or fsspec URI for reading bytes; a clear error if it is missing."""
    try:
        if is_local(uri):
            return _open_regular_file(local_path(uri))
        return fsspec.open(uri, "rb").open()
    except FileNotFoundError as err:
        raise CheckpointNotFoundError(
            f"checkpoint {uri!r} does not exist; check the path, or list the experiment's "
            "checkpoints with CheckpointStore(...).list()"
        ) from err


def _open_regular_file(path: Path) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file.

    A device (``/dev/zero``), a FIFO or a folder would hang or fill memory when hashed or
    loaded. ``O_NONBLOCK`` keeps the open of a FIFO from waiting for a writer.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a device, FIFO or socket"
            raise CheckpointError(f"{str(path)!r} is {kind}, not a checkpoint file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def load(uri: str, *, map_location: MapLocation = "cpu", trusted: bool | None = None) -> Any:
    """Load a checkpoint file safely.

    Args:
        uri: Local path or fsspec URI.
        map_location: As for ``torch.load``.
        trusted: Allow full unpickling. ``None`` follows :func:`trusted_loading`.

    Raises:
        CheckpointNotFoundError: The file does not exist.
        UnsafeCheckpointError: The pickle needs globals that safe loading refuses.
        CheckpointCorruptError: The file is not a readable torch checkpoint.
    """
    trusted = _TRUSTED.get() if trusted is None else trusted
    with open_binary(uri) as handle:
        data: BinaryIO = handle if is_local(uri) else io.BytesIO(handle.read())
        _check_expected(uri, data)
        try:
            if trusted:
                logger.warning("loading %s with full unpickling (trusted_loading is on)", uri)
                return torch.load(data, map_location=map_location, weights_only=False)
            with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
                return torch.load(data, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            if "Weights only load failed" in str(err) or "Unsupported global" in str(err):
                raise UnsafeCheckpointError(
                    f"refusing to load {uri!r}: it holds Python objects that safe loading "
                    f"does not allow ({_first_line(err)}). Nothing from the file was run. "
                    "If you trust the file's origin, load it inside `with "
                    "baton.trusted_loading():`"
                ) from err
            raise CheckpointCorruptError(f"{uri!r} is not a readable checkpoint: {err}") from err
        except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
            raise CheckpointCorruptError(
                f"{uri!r} is not a readable checkpoint (truncated or damaged?): {_first_line(err)}"
            ) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
