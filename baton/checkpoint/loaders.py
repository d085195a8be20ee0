"""Filename schemes for loading checkpoints: local paths, URLs, fsspec, model zoos.

``load_uri(filename)`` picks the loader registered for the longest matching prefix.
Built in: plain paths (``~`` expanded), ``file://``, ``http://``/``https://`` (downloaded
once into a cache folder), ``torchvision://NAME``, ``open-mmlab://NAME``, and any
other ``protocol://`` whose fsspec filesystem is installed (``memory://``, ``s3://``...).
Add your own with :func:`register_scheme`.
"""

import hashlib
import http.client
import json
import logging
import os
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec

from baton.checkpoint import io
from baton.errors import CheckpointError, CheckpointNotFoundError

logger = logging.getLogger(__name__)

Loader = Callable[[str, io.MapLocation], Any]

_SCHEMES: dict[str, Loader] = {}

# Names accepted by ``open-mmlab://``. Extend with register_open_mmlab() or point
# BATON_OPEN_MMLAB_JSON at a JSON file mapping names to URLs.
OPEN_MMLAB_URLS: dict[str, str] = {
    "resnet50_v1c": "https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth",
    "resnet101_v1c": "https://download.openmmlab.com/pretrain/third_party/resnet101_v1c-e67eebb6.pth",
    "vgg16_caffe": "https://download.openmmlab.com/pretrain/third_party/vgg16_caffe-292e1171.pth",
}

# Files above this size log their download progress.
PROGRESS_MIN_BYTES = 10 << 20


def register_scheme(prefix: str, loader: Loader, *, force: bool = False) -> None:
    """Register ``loader(filename, map_location)`` for filenames starting with ``prefix``.

    Raises:
        KeyError: ``prefix`` is taken and ``force`` is False.
    """
    if prefix in _SCHEMES and not force:
        raise KeyError(f"scheme {prefix!r} is already registered; pass force=True to replace it")
    _SCHEMES[prefix] = loader


def registered_schemes() -> list[str]:
    """The registered prefixes, for error messages and docs."""
    return sorted(_SCHEMES)


def register_open_mmlab(name: str, url: str) -> None:
    """Make ``open-mmlab://name`` resolve to ``url``."""
    OPEN_MMLAB_URLS[name] = url


def load_uri(filename: str, map_location: io.MapLocation = "cpu") -> Any:
    """Load the checkpoint a filename or URI names, through its scheme's loader."""
    for prefix in sorted(_SCHEMES, key=len, reverse=True):
        if filename.startswith(prefix):
            return _SCHEMES[prefix](filename, map_location)
    if "://" in filename:
        protocol = filename.split("://", 1)[0]
        if protocol in fsspec.available_protocols():
            return io.load(filename, map_location=map_location)
        raise CheckpointError(
            f"no loader for {filename!r}: scheme {protocol!r} is neither registered "
            f"({', '.join(registered_schemes())}) nor an installed fsspec protocol; "
            "install its fsspec filesystem or call baton.checkpoint.register_scheme()"
        )
    return io.load(filename, map_location=map_location)


def cache_dir() -> Path:
    """Where downloaded checkpoints are kept (``BATON_CACHE_DIR`` or ``~/.cache/baton``)."""
    return Path(os.environ.get("BATON_CACHE_DIR", "~/.cache/baton")).expanduser() / "checkpoints"


def download(url: str, *, timeout: float = 60.0) -> Path:
    """Download ``url`` into the cache once and return the cached file.

    The file is written under a temporary name and renamed only when every byte the
    server announced has arrived, so an interrupted download never leaves a file that
    could later be mistaken for a checkpoint.
    """
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    name = os.path.basename(url.split("?", 1)[0]) or "checkpoint.pth"
    target = cache_dir() / f"{key}-{name}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0)
            received = 0
            next_report = 0.1
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                received += len(chunk)
                if total >= PROGRESS_MIN_BYTES and received / total >= next_report:
                    logger.info("downloading %s: %d%%", name, int(100 * received / total))
                    next_report += 0.1
            if total and received != total:
                raise CheckpointError(
                    f"download of {url} stopped after {received} of {total} bytes; try again"
                )
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_name, target)
    except BaseException as err:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(err, urllib.error.HTTPError) and err.code == 404:
            raise CheckpointNotFoundError(f"{url} answered 404 Not Found") from err
        if isinstance(err, urllib.error.URLError):
            raise CheckpointError(f"cannot download {url}: {err.reason}") from err
        if isinstance(err, (http.client.HTTPException, ConnectionError, TimeoutError)):
            raise CheckpointError(
                f"download of {url} failed half way ({err!r}); try again"
            ) from err
        raise
    return target


def _load_local(filename: str, map_location: io.MapLocation) -> Any:
    return io.load(filename, map_location=map_location)


def _load_http(filename: str, map_location: io.MapLocation) -> Any:
    return io.load(str(download(filename)), map_location=map_location)


def _load_torchvision(filename: str, map_location: io.MapLocation) -> Any:
    name = filename[len("torchvision://") :]
    try:
        import torchvision
    except ImportError as err:
        raise CheckpointError(
            f"{filename!r} needs torchvision, which is not installed; install the "
            "torchvision build that matches your torch"
        ) from err
    try:
        weights = (
            torchvision.models.get_weight(name)
            if "." in name
            else torchvision.models.get_model_weights(name).DEFAULT
        )
    except (ValueError, KeyError, AttributeError) as err:
        raise CheckpointNotFoundError(
            f"torchvision has no weights named {name!r}; use a model name such as "
            "'resnet50' or a weight enum such as 'ResNet50_Weights.IMAGENET1K_V2'"
        ) from err
    return _load_http(weights.url, map_location)


def _open_mmlab_urls() -> dict[str, str]:
    urls = dict(OPEN_MMLAB_URLS)
    extra = os.environ.get("BATON_OPEN_MMLAB_JSON")
    if extra:
        urls.update(json.loads(Path(extra).read_text()))
    return urls


def _load_open_mmlab(filename: str, map_location: io.MapLocation) -> Any:
    name = filename[len("open-mmlab://") :]
    urls = _open_mmlab_urls()
    if name not in urls:
        known = ", ".join(sorted(urls))
        raise CheckpointNotFoundError(
            f"unknown open-mmlab model {name!r}; known names: {known}. Add one with "
            "baton.checkpoint.register_open_mmlab(name, url) or BATON_OPEN_MMLAB_JSON"
        )
    return load_uri(urls[name], map_location)


register_scheme("file://", _load_local)
register_scheme("http://", _load_http)
register_scheme("https://", _load_http)
register_scheme("torchvision://", _load_torchvision)
register_scheme("open-mmlab://", _load_open_mmlab)
