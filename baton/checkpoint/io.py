"""How checkpoints reach the disk and come back: atomic writes, checksums, safe loading.

The one import for checkpoint I/O; each part lives in a module of its own:

* :mod:`baton.checkpoint.atomic`: atomic writes (temporary file, fsync, rename, fsync of
  the folder) with the sha256 computed from the bytes as they are written.
* :mod:`baton.checkpoint.background`: the background save (a forked child or a thread).
* :mod:`baton.checkpoint.safe_load`: ``weights_only`` loading, :func:`trusted_loading`,
  :func:`expect_bytes`, and reading a file's bytes and hash.
* :mod:`baton.checkpoint.location`: local paths versus other fsspec URIs.
"""

from baton.checkpoint.atomic import fsync_dir, save, write_text_atomic
from baton.checkpoint.background import save_in_background
from baton.checkpoint.location import is_local, local_path
from baton.checkpoint.safe_load import (
    SAFE_GLOBALS,
    MapLocation,
    expect_bytes,
    load,
    load_mapped,
    load_meta,
    open_binary,
    sha256_of,
    trusted_loading,
)

__all__ = [
    "SAFE_GLOBALS",
    "MapLocation",
    "expect_bytes",
    "fsync_dir",
    "is_local",
    "load",
    "load_mapped",
    "load_meta",
    "local_path",
    "open_binary",
    "save",
    "save_in_background",
    "sha256_of",
    "trusted_loading",
    "write_text_atomic",
]
