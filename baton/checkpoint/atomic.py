"""Atomic, hashed checkpoint writes.

Writes go to a temporary file in the target's directory, are flushed and fsynced, renamed
over the target, and the directory is fsynced, so a crash leaves either the old file or the
new one, never half of one. The sha256 is computed from the bytes as they are written, not
in a second pass over the file.
"""

import contextlib
import ctypes
import ctypes.util
import errno
import glob
import hashlib
import io
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import fsspec
import torch

from baton.checkpoint.location import is_local, local_path
from baton.errors import CheckpointWriteError

# Checkpoint I/O logs on one channel, named for baton.checkpoint.io, which re-exports this.
logger = logging.getLogger("baton.checkpoint.io")

# errno values that mean "the disk cannot take this file"
_SPACE_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS}


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by the owner only; checkpoints get the usual mode.
_FILE_MODE = 0o666 & ~_current_umask()


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
    Writes under ``INLINE`` are hashed in this thread when nothing waits in the helper's
    queue; other small writes are copied, so their buffers may be reused at once. With
    ``fd``, disk writeback starts every ``WRITEBACK_EVERY`` bytes, so the disk works while the hash
    is computed and the final fsync has little left to do.
    """

    PIECE = 8 << 20
    # Smaller writes are hashed here when the helper has nothing queued: cheaper than a
    # copy and a hand-off (torch.save writes a header and a padding record per tensor).
    INLINE = 256 << 10
    WRITEBACK_EVERY = 64 << 20

    def __init__(self, raw: BinaryIO, fd: int | None = None, borrowed_buffers_live: bool = False):
        super().__init__()
        self._raw = raw
        self._fd = fd if _start_writeback is not None else None
        self._defer = borrowed_buffers_live
        self._digest = hashlib.sha256()
        self._hasher: ThreadPoolExecutor | None = None  # started by the first large write
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
        if length < self.INLINE and (self._pending is None or self._pending.done()):
            self._digest.update(view)  # nothing queued before it: the order holds
            self._raw.write(view)
        elif length < self.PIECE:
            self._pending = self._hashing().submit(self._digest.update, bytes(view))
            self._raw.write(view)
        else:
            for offset in range(0, length, self.PIECE):
                piece = view[offset : offset + self.PIECE]
                self._pending = self._hashing().submit(self._digest.update, piece)  # FIFO
                self._raw.write(piece)
                self._writeback(len(piece))
            if not self._defer:
                self._pending.result()
        self.size += length
        return length

    def _hashing(self) -> ThreadPoolExecutor:
        if self._hasher is None:
            self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="baton-sha256")
        return self._hasher

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
        if self._hasher is not None:
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
