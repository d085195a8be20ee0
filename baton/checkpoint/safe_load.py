"""Safe checkpoint loading, and reading a checkpoint's bytes.

Loading uses ``torch.load(weights_only=True)``: a pickle that would run code is refused.
Files from a trusted source that need full unpickling (old mmengine checkpoints holding
arbitrary objects) load only inside :func:`trusted_loading`, an explicit opt-in. Inside
:func:`expect_bytes`, a load checks the very bytes it loads against a reference's size and
sha256.
"""

import collections
import contextlib
import contextvars
import io
import logging
import os
import pickle
import stat
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import fsspec
import torch

from baton.checkpoint import digests, sharded
from baton.checkpoint.location import is_local, local_path
from baton.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
    UnsafeCheckpointError,
)

# Checkpoint I/O logs on one channel, named for baton.checkpoint.io, which re-exports this.
logger = logging.getLogger("baton.checkpoint.io")

# The only non-primitive globals our loader accepts. Our own files hold nothing but
# dicts, lists, tuples, numbers, strings and tensors; mmengine's schedulers store
# MultiStepLR milestones as a Counter.
SAFE_GLOBALS: tuple[Any, ...] = (collections.Counter,)

_TRUSTED = contextvars.ContextVar("baton_trusted_loading", default=False)
# (uri, size, sha256) the next load of that uri must match (see expect_bytes).
_EXPECTED: contextvars.ContextVar[tuple[str, int, str] | None] = contextvars.ContextVar(
    "baton_expected_bytes", default=None
)

MapLocation = str | torch.device | Callable | dict | None


@contextlib.contextmanager
def expect_bytes(uri: str, size: int, sha256: str) -> Iterator[None]:
    """Within the block, the checkpoint loaded (``uri``, one load) must have this size and
    sha256 (its reference's), checked on the very bytes that are parsed: a file replaced
    or damaged since the reference was taken is refused, not loaded. It holds for the
    file the scheme's loader opens too (the cached download of an ``https://`` or
    ``open-mmlab://`` URI), so a stale cache is refused as well.

    Raises (from the load):
        CheckpointCorruptError: The bytes differ.
    """
    token = _EXPECTED.set((uri, size, sha256))
    try:
        yield
    finally:
        _EXPECTED.reset(token)


def _check_expected(uri: str, handle: BinaryIO) -> None:
    """Hash what ``handle`` (the file ``uri``, opened to load) holds against the
    expectation, if there is one; rewind it.

    A local file this process hashed already, unchanged since, is not read again
    (:mod:`baton.checkpoint.digests`)."""
    expected = _EXPECTED.get()
    if expected is None:
        return
    _EXPECTED.set(None)  # one load: a loader that reads more files checks only the first
    local = is_local(uri)
    remembered = digests.known(local_path(uri), handle.fileno()) if local else None
    if remembered is not None:
        size, digest = os.fstat(handle.fileno()).st_size, remembered
    else:
        size, digest = (
            digests.hash_file(local_path(uri), handle) if local else digests.hash_handle(handle)
        )
        handle.seek(0)
    if (size, digest) != expected[1:]:
        opened = "" if uri == expected[0] else f" (loaded from {uri!r})"
        raise CheckpointCorruptError(
            f"{expected[0]!r}{opened} is not the checkpoint its reference names (size {size} "
            f"vs {expected[1]}, sha256 {digest[:12]} vs {expected[2][:12]}): it was "
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


def sha256_of(uri: str, chunk_size: int = 8 << 20) -> tuple[int, str]:
    """Size and sha256 of a file's bytes, read in chunks (remembered for a local file,
    see :mod:`baton.checkpoint.digests`); of a sharded checkpoint, its folder's
    (:func:`baton.checkpoint.sharded.digest`)."""
    if _is_sharded(uri):
        return sharded.digest(local_path(uri))
    with open_binary(uri) as handle:
        if is_local(uri):
            return digests.hash_file(local_path(uri), handle)
        return digests.hash_handle(handle, chunk_size)


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
    if _is_sharded(uri):
        return _load_sharded(uri, map_location, trusted)
    with open_binary(uri) as handle:
        data: BinaryIO = handle if is_local(uri) else io.BytesIO(handle.read())
        _check_expected(uri, data)
        return _torch_load(uri, data, map_location=map_location, trusted=trusted)


def _torch_load(
    uri: str, source: BinaryIO | str, *, map_location: MapLocation, trusted: bool, mmap=False
) -> Any:
    """``torch.load`` of ``source`` (the file ``uri``), safely unless ``trusted``, its
    errors turned into baton's."""
    try:
        if trusted:
            logger.warning("loading %s with full unpickling (trusted_loading is on)", uri)
            return torch.load(source, map_location=map_location, weights_only=False)
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(source, map_location=map_location, weights_only=True, mmap=mmap)
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


def load_mapped(uri: str) -> tuple[Any, tuple[int, int] | None]:
    """Load a checkpoint safely with its tensors memory-mapped, when it can be: a local
    file of torch's zip format is mapped (its tensors are read from the file only as they
    are used, page by page); anything else (a legacy pickle, a remote URI, a folder) is
    loaded whole, as :func:`load` does.

    The file mapped is the one opened, hashed (inside :func:`expect_bytes`) and checked to
    be a regular file: it is mapped through its open descriptor where the system names
    one (``/proc/self/fd``), so a file renamed over it meanwhile is not the one read.

    Returns:
        The checkpoint, and the mapped file's ``(st_dev, st_ino)`` (``None`` when it was
        loaded whole), by which its pages can be found and given back
        (:mod:`baton.checkpoint.mapped`).

    Raises:
        As :func:`load`.
    """
    if not is_local(uri) or _TRUSTED.get() or local_path(uri).is_dir():
        # A folder (a sharded checkpoint) is :func:`load`'s to read, or to refuse.
        return load(uri), None
    with _open_regular_file(local_path(uri)) as handle:
        if not handle.read(4).startswith(b"PK"):  # the legacy format cannot be mapped
            handle.seek(0)
            _check_expected(uri, handle)
            return _torch_load(uri, handle, map_location="cpu", trusted=False), None
        handle.seek(0)
        _check_expected(uri, handle)
        status = os.fstat(handle.fileno())
        by_descriptor = Path(f"/proc/self/fd/{handle.fileno()}")
        source = str(by_descriptor) if by_descriptor.exists() else str(local_path(uri))
        checkpoint = _torch_load(uri, source, map_location="cpu", trusted=False, mmap=True)
    return checkpoint, (status.st_dev, status.st_ino)


def load_meta(uri: str) -> dict:
    """A checkpoint's ``meta`` (``{}`` if it has none), without reading its tensors where
    that can be avoided: a local file of torch's zip format is memory-mapped, so only its
    pickled structure is read; of a sharded checkpoint, ``baton.pt`` and the tensors of
    ``meta`` are read; anything else is loaded whole (safely, as :func:`load`).

    Raises:
        As :func:`load`.
    """
    checkpoint = None
    if _is_sharded(uri):
        # Only the tensors of meta (its RNG states) are read, not the weights.
        read = sharded.read(
            local_path(uri), load_skeleton=lambda path: load(str(path)), sections=("meta",)
        )
        meta = read.get("meta")
        return meta if isinstance(meta, dict) else {}
    if is_local(uri):
        _open_regular_file(local_path(uri)).close()  # a device or FIFO is refused, not mapped
        try:
            with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
                checkpoint = torch.load(
                    local_path(uri), map_location="cpu", weights_only=True, mmap=True
                )
        except (RuntimeError, pickle.UnpicklingError, ValueError, OSError, EOFError):
            checkpoint = None  # the legacy format, or a problem load reports better
    if checkpoint is None:
        checkpoint = load(uri)
    meta = checkpoint.get("meta") if isinstance(checkpoint, dict) else None
    return meta if isinstance(meta, dict) else {}


def _is_sharded(uri: str) -> bool:
    return is_local(uri) and sharded.is_sharded(local_path(uri))


def _load_sharded(uri: str, map_location: MapLocation, trusted: bool) -> dict:
    """A sharded checkpoint (a folder, :mod:`baton.checkpoint.sharded`) loaded whole, as
    the dict a file holds; within :func:`expect_bytes`, its folder's digest is checked
    first. Its tensors are read on the CPU, then moved as ``map_location`` says."""
    expected = _EXPECTED.get()
    if expected is not None:
        _EXPECTED.set(None)
        size, digest = sharded.digest(local_path(uri))
        if (size, digest) != expected[1:]:
            raise CheckpointCorruptError(
                f"{expected[0]!r} is not the checkpoint its reference names (size {size} vs "
                f"{expected[1]}, sha256 {digest[:12]} vs {expected[2][:12]}): it was "
                "replaced or damaged since; resume from another checkpoint"
            )
    checkpoint = sharded.read(
        local_path(uri), load_skeleton=lambda path: load(str(path), trusted=trusted)
    )
    if map_location in (None, "cpu") or map_location == torch.device("cpu"):
        return checkpoint
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)  # torch.load's own map_location rules, every form of it
    buffer.seek(0)
    with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
        return torch.load(buffer, map_location=map_location, weights_only=True)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
