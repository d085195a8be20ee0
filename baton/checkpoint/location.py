"""Where a checkpoint URI points: a local path (or ``file://`` URI), or another fsspec
URI. Writers and readers of checkpoint bytes both ask, so it is its own small module."""

from pathlib import Path


def is_local(uri: str) -> bool:
    """True for plain paths and ``file://`` URIs."""
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> Path:
    """The filesystem path of a local URI (``~`` expanded, ``file://`` stripped)."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return Path(uri).expanduser()
