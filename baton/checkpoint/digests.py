"""The sha256 of local files this process has hashed, remembered by what identifies their
bytes: path, device, inode, size, and modification and change times.

A resume hashes its checkpoint twice otherwise: once when the store verifies the file it
chooses (``CheckpointStore.latest``), once when the load checks that the bytes it parses
are the ones the reference names (``io.expect_bytes``). With the digest remembered, the
load reads the file once.

When a remembered digest can be trusted: any write to a file changes its change time
(which no call can set back), and checkpoints are replaced by rename (a new inode). Two
cases are left, and neither is remembered:

- a file whose identity changed while it was hashed (a write during the read): its
  timestamps could belong to bytes other than those hashed;
- a file written less than :data:`RACY_S` ago ("racily clean", as git calls it): on a
  filesystem with coarse timestamps (a few milliseconds on older Linux kernels, seconds
  on others), a second write in the same tick would leave the same identity.

The path keeps a deleted file's inode, reused by a new file, from matching another path.
Only this process's own hashing is remembered.
"""

import hashlib
import os
import threading
import time
from collections import OrderedDict
from typing import BinaryIO

_MAX = 256
# A file changed this recently is hashed every time (see the module docstring).
RACY_S = 2.0
_KNOWN: OrderedDict[tuple, str] = OrderedDict()
_LOCK = threading.Lock()


def identity(path: str | os.PathLike, fd: int) -> tuple:
    """What identifies the bytes of ``path``, open as ``fd`` (see the module docstring)."""
    st = os.fstat(fd)
    return (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def hash_file(path: str | os.PathLike, handle: BinaryIO) -> tuple[int, str]:
    """Size and sha256 of the local file ``path``, open as ``handle`` (from its start);
    remembered when that is safe (see the module docstring)."""
    before = identity(path, handle.fileno())
    size, digest = hash_handle(handle)
    after = identity(path, handle.fileno())
    changed_ns = max(after[4], after[5])
    if before == after and time.time_ns() - changed_ns >= RACY_S * 1e9:
        with _LOCK:
            _KNOWN[after] = digest
            _KNOWN.move_to_end(after)
            while len(_KNOWN) > _MAX:
                _KNOWN.popitem(last=False)
    return size, digest


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
