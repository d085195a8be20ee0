"""The sha256 of local files this process has hashed, remembered by what identifies their
bytes: path, device, inode, size, and modification and change times.

A resume hashes its checkpoint twice otherwise: once when the store verifies the file it
chooses (``CheckpointStore.latest``), once when the load checks that the bytes it parses
are the ones the reference names (``io.expect_bytes``). With the digest remembered, the
load reads the file once. Any write to the file changes its change time (which no call
can set back), and checkpoints are replaced by rename (a new inode), so a remembered
digest never stands for other bytes; the path keeps a deleted file's inode, reused by a
new file written within the same timestamp tick, from matching. Only this process's own
hashing is remembered.
"""

import hashlib
import os
import threading
from collections import OrderedDict
from typing import BinaryIO

_MAX = 256
_KNOWN: OrderedDict[tuple, str] = OrderedDict()
_LOCK = threading.Lock()


def identity(path: str | os.PathLike, fd: int) -> tuple:
    """What identifies the bytes of ``path``, open as ``fd`` (see the module docstring)."""
    st = os.fstat(fd)
    return (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def remember(path: str | os.PathLike, fd: int, digest: str) -> None:
    """Record the sha256 of ``path``, open as ``fd`` (just hashed by this process)."""
    key = identity(path, fd)
    with _LOCK:
        _KNOWN[key] = digest
        _KNOWN.move_to_end(key)
        while len(_KNOWN) > _MAX:
            _KNOWN.popitem(last=False)


def known(path: str | os.PathLike, fd: int) -> str | None:
    """The remembered sha256 of ``path``, open as ``fd``, if its bytes are unchanged."""
    with _LOCK:
        return _KNOWN.get(identity(path, fd))


def hash_handle(handle: BinaryIO, chunk_size: int = 8 << 20) -> tuple[int, str]:
    """Size and sha256 of what ``handle`` holds from its position, read in chunks."""
    digest, size = hashlib.sha256(), 0
    while chunk := handle.read(chunk_size):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()
