"""A checkpoint file read through a memory map, its pages given back once read.

``torch.load(mmap=True)`` reads a tensor's bytes only when they are used, but every page
read stays mapped, and counted in the process's memory, until the checkpoint is dropped:
comparing two 1 GiB files that way ends with 2 GiB resident. :class:`MappedCheckpoint`
gives the pages of each compared part back to the kernel (``madvise(MADV_DONTNEED)``: the
mapping is private and never written, so a page is dropped, and read from the file again
if touched again). Only pages inside the mapping of the file itself, found in
``/proc/self/maps`` by its device and inode, are ever released; anything else (a file
loaded whole, another system) is left alone, and the comparison is still right, only not
as small.
"""

import ctypes
import ctypes.util
import logging
import mmap
import os
from collections.abc import Iterator
from typing import Any

import torch

from baton.checkpoint import compare, safe_load

logger = logging.getLogger("baton.checkpoint.io")

_MADV_DONTNEED = 4  # Linux's value, the only system this is done on


def _file_ranges(identity: tuple[int, int]) -> list[tuple[int, int]]:
    """The address ranges of this process's mappings of the file ``(st_dev, st_ino)``."""
    device, inode = identity
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) < 5 or int(fields[4]) != inode:
                    continue
                major, minor = (int(x, 16) for x in fields[3].split(":"))
                if os.makedev(major, minor) != device:
                    continue
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    except OSError:
        return []
    return ranges


def _madvise() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    function = libc.madvise
    function.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    function.restype = ctypes.c_int
    return function


class MappedCheckpoint:
    """A checkpoint file loaded safely with memory-mapped tensors (see
    :func:`baton.checkpoint.safe_load.load_mapped`), whose entries can be compared one at
    a time while memory stays small.

    Args:
        uri: The file (any URI :func:`~baton.checkpoint.safe_load.load` takes; only a local
            file of torch's zip format is mapped).
    """

    def __init__(self, uri: str):
        self.uri = uri
        self.checkpoint, identity = safe_load.load_mapped(uri)
        self._ranges = _file_ranges(identity) if identity is not None else []
        self._madvise = _madvise() if self._ranges and os.uname().sysname == "Linux" else None

    @property
    def mapped(self) -> bool:
        """Whether pages are given back as they are compared."""
        return self._madvise is not None

    def entries(self) -> Iterator[tuple[str, Any]]:
        """The checkpoint's entries (:func:`baton.checkpoint.compare.entries`)."""
        return compare.entries(self.checkpoint)

    def release(self, tensor: torch.Tensor) -> None:
        """Give back the pages that hold ``tensor``'s elements, if they are pages of the
        mapped file; the tensor stays valid (its pages are read again if used)."""
        if self._madvise is None or tensor.numel() == 0:
            return
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        page = mmap.PAGESIZE
        for low, high in self._ranges:
            if low <= start and end <= high:
                first = max(low, start - start % page)
                last = min(high, end + (-end) % page)
                if self._madvise(first, last - first, _MADV_DONTNEED) != 0:
                    logger.debug("madvise failed: %s", os.strerror(ctypes.get_errno()))
                return


def diff_files(a: str, b: str, *, ignore: tuple[str, ...] = ()) -> Iterator[compare.Difference]:
    """The entries that differ between two checkpoint files (see
    :func:`baton.checkpoint.compare.diff`), read through memory maps one part at a time:
    memory stays about a chunk per side plus the files' structure, whatever their size.

    Raises:
        As :func:`baton.checkpoint.safe_load.load`.
    """
    first, second = MappedCheckpoint(a), MappedCheckpoint(b)
    yield from compare.diff(
        first.entries(),
        second.entries(),
        ignore=ignore,
        release_a=first.release,
        release_b=second.release,
    )
