"""Sharded checkpoints: one checkpoint written by many processes, through
``torch.distributed.checkpoint`` (DCP).

A sharded checkpoint is a folder ``epoch_0003.dcp/`` holding

* DCP's files: ``.metadata`` (written last, by the coordinator) and one
  ``__<rank>_0.distcp`` per rank that wrote tensors;
* ``baton.pt``: everything that is not a tensor (``meta``, the schedulers, the
  optimizer's param groups, the structure of the whole dict), written by the coordinator
  with ``torch.save`` and read back with ``weights_only=True``.

Split this way, a loaded sharded checkpoint is the very dict a ``.pth`` file holds
(:func:`join`), so everything that reads a checkpoint (resume, ``load_from``, evaluation,
``baton ckpt``) reads both, and a checkpoint written by N processes loads into 1 or M.

DCP keeps no Python object of ours: only tensors go through it, so its reader never
unpickles a value (its ``load_bytes`` would, with ``weights_only=False``). DCP's own
``.metadata`` is a pickle; :class:`SafeReader` reads it with an unpickler that accepts
only DCP's metadata classes.

A sharded checkpoint is written into a temporary folder (``.writing-<name>``) and renamed
to its name once every rank's file, DCP's metadata and ``baton.pt`` are durable; only then
is it committed (size and sha256 of the folder, :func:`digest`). A kill before the rename
leaves a temporary folder that nothing reads and the next run removes.
"""

import contextlib
import hashlib
import io
import os
import pickle
import shutil
import stat
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from baton.checkpoint import digests
from baton.errors import CheckpointCorruptError, UnsafeCheckpointError

SUFFIX = ".dcp"
# The coordinator's file of everything that is not a tensor.
SKELETON_FILE = "baton.pt"
# DCP's metadata file: its presence says every rank's part was written.
DCP_METADATA = ".metadata"
# Prefix of a folder being written; never read, removed by the next run.
WRITING_PREFIX = ".writing-"
# Prefix of a folder being deleted (renamed first, so a deletion is whole or nothing).
DELETING_PREFIX = ".deleting-"
# Marker of a tensor's place in the skeleton: {_TENSOR: "key in DCP"}.
_TENSOR = "__dcp_tensor__"

# The only classes DCP's ``.metadata`` pickle may name.
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "TensorProperties",
        "ChunkStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "BytesStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
}


def is_sharded(path: str | os.PathLike) -> bool:
    """True for a folder that holds a sharded checkpoint (a real folder, not a link)."""
    path = Path(path)
    return path.is_dir() and not path.is_symlink()


def split(checkpoint: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a checkpoint dict, keyed by their place (``state_dict/fc.weight``,
    ``optimizer/state/0/exp_avg``), and the dict with each tensor replaced by a marker."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, place: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[place] = value
            return {_TENSOR: place}
        if isinstance(value, dict):
            return type(value)((k, walk(v, f"{place}/{k}")) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return type(value)(walk(v, f"{place}/{i}") for i, v in enumerate(value))
        return value

    skeleton = {k: walk(v, str(k)) for k, v in checkpoint.items()}
    return tensors, skeleton


def join(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The checkpoint dict again: :func:`split`'s markers replaced by their tensors."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {_TENSOR}:
            key = skeleton[_TENSOR]
            if key not in tensors:
                raise CheckpointCorruptError(f"the sharded checkpoint has no tensor {key!r}")
            return tensors[key]
        return type(skeleton)((k, join(v, tensors)) for k, v in skeleton.items())
    if isinstance(skeleton, (list, tuple)):
        return type(skeleton)(join(v, tensors) for v in skeleton)
    return skeleton


def tensor_keys(skeleton: Any) -> list[str]:
    """The DCP keys of the tensors a skeleton names."""
    keys: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            if set(value) == {_TENSOR}:
                keys.append(value[_TENSOR])
                return
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(skeleton)
    return keys


def files_of(path: str | os.PathLike) -> list[str]:
    """The names of a sharded checkpoint's files, sorted.

    Raises:
        CheckpointCorruptError: It holds something other than regular files, or lacks
            DCP's metadata or ``baton.pt`` (a write that did not finish).
    """
    path = Path(path)
    names = []
    for entry in os.scandir(path):
        if not stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode):
            raise CheckpointCorruptError(
                f"{path / entry.name} is not a regular file; a sharded checkpoint holds only "
                "the files its ranks wrote"
            )
        names.append(entry.name)
    missing = [n for n in (DCP_METADATA, SKELETON_FILE) if n not in names]
    if missing:
        raise CheckpointCorruptError(
            f"{path} is not a complete sharded checkpoint (no {', '.join(missing)}); "
            "resume from another checkpoint"
        )
    return sorted(names)


def digest(path: str | os.PathLike) -> tuple[int, str]:
    """Total size and sha256 of a sharded checkpoint: the sha256 of one line per file
    (name, size, sha256), so a changed, added or removed file changes it."""
    path = Path(path)
    total = 0
    lines = hashlib.sha256()
    for name in files_of(path):
        file = path / name
        with open(file, "rb") as handle:
            size, sha = digests.hash_file(file, handle)
        total += size
        lines.update(f"{name}\0{size}\0{sha}\n".encode())
    return total, lines.hexdigest()


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS or _is_torch_constant(module, name):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"refusing DCP metadata that names {module}.{name}: only DCP's own metadata "
            "classes may appear there; nothing from the file was run"
        )


def _is_torch_constant(module: str, name: str) -> bool:
    """``torch.float32``, ``torch.strided``, ``torch.contiguous_format``: the dtypes,
    layouts and memory formats a tensor's properties name."""
    value = getattr(torch, name, None) if module == "torch" else None
    return isinstance(value, (torch.dtype, torch.layout, torch.memory_format))


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader, with its ``.metadata`` pickle read by an unpickler that allows
    only DCP's metadata classes (DCP itself unpickles it without limits)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        with self.fs.create_stream(self._get_metadata_path(rank), "rb") as handle:
            data = handle.read()
        try:
            metadata = _MetadataUnpickler(io.BytesIO(data)).load()
        except UnsafeCheckpointError:
            raise
        except Exception as err:
            raise CheckpointCorruptError(f"unreadable DCP metadata in {self.path}: {err}") from err
        if not isinstance(metadata, Metadata):
            raise CheckpointCorruptError(f"{self.path}/.metadata is not DCP metadata")
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read(path: str | os.PathLike, *, load_skeleton: Callable[[Path], Any]) -> dict:
    """Load a whole sharded checkpoint into one process, as the dict a ``.pth`` holds.

    Works with or without a process group (each process reads every part it needs on its
    own), so a checkpoint written by N ranks loads into 1 or M.

    Args:
        load_skeleton: Loads ``baton.pt`` safely (``weights_only``).

    Raises:
        CheckpointCorruptError: A part is missing or does not fit the metadata.
        UnsafeCheckpointError: DCP's metadata names a class it may not.
    """
    path = Path(path)
    files_of(path)
    skeleton = load_skeleton(path / SKELETON_FILE)
    if not isinstance(skeleton, dict):
        raise CheckpointCorruptError(f"{path / SKELETON_FILE} does not hold a checkpoint dict")
    reader = SafeReader(str(path))
    stored = reader.read_metadata().state_dict_metadata
    tensors: dict[str, torch.Tensor] = {}
    for key in tensor_keys(skeleton):
        info = stored.get(key)
        if not isinstance(info, TensorStorageMetadata):
            raise CheckpointCorruptError(f"{path} has no tensor {key!r} in its DCP metadata")
        tensors[key] = torch.empty(info.size, dtype=info.properties.dtype)
    if tensors:
        try:
            with _single_process_quiet():
                dcp.load(tensors, storage_reader=SafeReader(str(path)), no_dist=True)
        except (RuntimeError, ValueError, OSError, AssertionError) as err:
            raise CheckpointCorruptError(f"{path} cannot be read: {err}") from err
        except dcp.api.CheckpointException as err:
            raise CheckpointCorruptError(f"{path} cannot be read: {err}") from err
    return join(skeleton, tensors)


def writing_folder(target: Path) -> Path:
    """The temporary folder a sharded checkpoint for ``target`` is written into."""
    return target.parent / f"{WRITING_PREFIX}{target.name}"


def write(
    checkpoint: dict,
    folder: Path,
    *,
    save_skeleton: Callable[[dict, Path], Any],
    process_group: "dist.ProcessGroup | None" = None,
    coordinator: bool = True,
    background: bool = False,
) -> Future | None:
    """Write this rank's part of ``checkpoint`` into ``folder`` (every rank calls it with
    the same dict; DCP spreads the writes of replicated tensors across ranks). The
    coordinator also writes ``baton.pt``. With ``background``, DCP stages the tensors
    to the CPU now and writes them from a thread (its ``async_save``, on
    ``process_group``, which must be a CPU-capable group of its own); the returned future
    is done when this rank's part and, on the coordinator, the metadata are written.

    Args:
        save_skeleton: Writes the skeleton dict durably (an fsync'ed file).
    """
    tensors, skeleton = split(checkpoint)
    folder.mkdir(parents=True, exist_ok=True)
    if coordinator:
        save_skeleton(skeleton, folder / SKELETON_FILE)
    writer = dcp.FileSystemWriter(str(folder), sync_files=True, overwrite=True)
    no_dist = not (dist.is_available() and dist.is_initialized())
    if background:
        return dcp.async_save(
            tensors, storage_writer=writer, process_group=process_group, no_dist=no_dist
        )
    with _single_process_quiet():
        dcp.save(tensors, storage_writer=writer, process_group=process_group, no_dist=no_dist)
    return None


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it "assumes" a single process whenever no group is initialized;
    here that is the intent, said by ``no_dist``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def publish(folder: Path, target: Path) -> tuple[int, str]:
    """Make a fully written folder the checkpoint ``target``: fsync it, rename it, fsync
    the parent. Returns its size and sha256 (:func:`digest`).

    Raises:
        CheckpointCorruptError: The folder is not complete.
    """
    size, sha = digest(folder)
    _fsync_dir(folder)
    if target.exists():
        remove(target)
    os.rename(folder, target)
    _fsync_dir(target.parent)
    return size, sha


def remove(path: Path) -> None:
    """Delete a sharded checkpoint whole: renamed away first, so that a kill during the
    deletion leaves no half checkpoint under its name (the next run removes the rest)."""
    doomed = path.parent / f"{DELETING_PREFIX}{path.name}"
    if doomed.exists():
        shutil.rmtree(doomed)
    os.rename(path, doomed)
    _fsync_dir(path.parent)
    shutil.rmtree(doomed)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
