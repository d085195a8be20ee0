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
import math
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
from torch.distributed.checkpoint.filesystem import FileSystem, _StorageInfo
from torch.distributed.checkpoint.metadata import (
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)

from baton.checkpoint import digests
from baton.checkpoint.atomic import fsync_dir
from baton.errors import CheckpointCorruptError, CheckpointNotFoundError, UnsafeCheckpointError

SUFFIX = ".dcp"
# The coordinator's file of everything that is not a tensor.
SKELETON_FILE = "baton.pt"
# DCP's metadata file: its presence says every rank's part was written.
DCP_METADATA = ".metadata"
# Prefix of a folder being written; never read, removed by the next run.
WRITING_PREFIX = ".writing-"
# Prefix of a folder being deleted (renamed first, so a deletion is whole or nothing).
DELETING_PREFIX = ".deleting-"
# DCP metadata larger than this is not read (a hostile file must not exhaust memory);
# a model of a million tensors has a few hundred megabytes of it at most.
MAX_METADATA_BYTES = 512 << 20
# baton.pt larger than this is not read: it holds no tensor, only meta, the config and
# the optimizer's and schedulers' settings.
MAX_SKELETON_BYTES = 512 << 20
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
        CheckpointNotFoundError: There is no such folder.
        CheckpointCorruptError: It is a link or not a folder, holds something other than
            regular files, or lacks DCP's metadata or ``baton.pt`` (a write that did not
            finish).
    """
    return sorted(_files_with_sizes(Path(path)))


def open_folder(path: str | os.PathLike) -> int:
    """A descriptor of a sharded checkpoint's folder, opened without following a link.

    Raises:
        CheckpointNotFoundError: There is no such folder.
        CheckpointCorruptError: It is a link or not a folder.
    """
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError as err:
        raise CheckpointNotFoundError(f"sharded checkpoint {str(path)!r} does not exist") from err
    except OSError as err:
        raise CheckpointCorruptError(
            f"{str(path)!r} is a link or not a folder; a sharded checkpoint is a real folder "
            "and is never reached through a link"
        ) from err


def _listing(fd: int, where: Path) -> dict[str, int]:
    """Name -> size of the files in the folder open as ``fd`` (``where``, for messages),
    after checking that it holds only regular files, DCP's metadata and ``baton.pt``
    among them."""
    sizes: dict[str, int] = {}
    for name in os.listdir(fd):
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointCorruptError(
                f"{where / name} is not a regular file (a link, a folder, a FIFO or a "
                "device); a sharded checkpoint holds only the files its ranks wrote, and "
                "this one is not read: resume from another checkpoint"
            )
        sizes[name] = st.st_size
    missing = [n for n in (DCP_METADATA, SKELETON_FILE) if n not in sizes]
    if missing:
        raise CheckpointCorruptError(
            f"{where} is not a complete sharded checkpoint (no {', '.join(missing)}); "
            "resume from another checkpoint"
        )
    return sizes


def _open_member(fd: int, name: str, where: Path) -> int:
    """A descriptor of the regular file ``name`` in the folder open as ``fd``: never a
    link followed, never a FIFO waited on."""
    try:
        member = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    except OSError as err:
        raise CheckpointCorruptError(
            f"{where / name} cannot be opened as a regular file ({err.strerror}); "
            "resume from another checkpoint"
        ) from err
    if not stat.S_ISREG(os.fstat(member).st_mode):
        os.close(member)
        raise CheckpointCorruptError(
            f"{where / name} is not a regular file; a sharded checkpoint holds only the "
            "files its ranks wrote"
        )
    os.set_blocking(member, True)
    return member


def digest(path: str | os.PathLike) -> tuple[int, str]:
    """Total size and sha256 of a sharded checkpoint: the sha256 of one line per file
    (name, size, sha256), so a changed, added or removed file changes it.

    Raises:
        As :func:`files_of`.
    """
    fd = open_folder(path)
    try:
        return folder_digest(fd, Path(path))
    finally:
        os.close(fd)


def folder_digest(fd: int, where: Path, *, expected_size: int | None = None) -> tuple[int, str]:
    """:func:`digest` of the folder open as ``fd`` (``where``: its path, for messages and
    for the remembered digests of :mod:`baton.checkpoint.digests`).

    Raises:
        CheckpointCorruptError: It is not a complete sharded checkpoint of regular files,
            or its files do not add up to ``expected_size`` (checked before any byte is
            read).
    """
    sizes = _listing(fd, where)
    total = sum(sizes.values())
    if expected_size is not None and total != expected_size:
        raise CheckpointCorruptError(
            f"{where} holds {total} bytes in {len(sizes)} files but {expected_size} were "
            "committed (a shard added, removed or changed); resume from another checkpoint"
        )
    lines = hashlib.sha256()
    total = 0
    for name in sorted(sizes):
        member = _open_member(fd, name, where)
        with os.fdopen(member, "rb") as handle:
            remembered = digests.known(where / name, member)
            if remembered is not None:
                size, sha = os.fstat(member).st_size, remembered
            else:
                size, sha = digests.hash_file(where / name, handle)
        total += size
        lines.update(f"{name}\0{size}\0{sha}\n".encode())
    return total, lines.hexdigest()


def is_removable(path: Path) -> bool:
    """True for what :func:`remove` may delete: a real folder (not a link) that holds
    only regular files. Anything else under a checkpoint's name is left alone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        return all(
            stat.S_ISREG(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
            for name in os.listdir(fd)
        )
    finally:
        os.close(fd)


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


class _NoLinkFileSystem(FileSystem):
    """DCP's local file system, opening only regular files and never through a link: a
    shard swapped for a link or a FIFO after the folder was checked is refused too."""

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        if mode != "rb":
            raise CheckpointCorruptError(f"a sharded checkpoint is only read here, not {mode!r}")
        path = Path(path)
        fd = open_folder(path.parent)
        try:
            member = _open_member(fd, path.name, path.parent)
        finally:
            os.close(fd)
        with os.fdopen(member, "rb") as stream:
            yield stream


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader, made safe for a folder nobody vouches for:

    * its ``.metadata`` pickle is read (at most :data:`MAX_METADATA_BYTES`) by an
      unpickler that allows only DCP's metadata classes (DCP itself unpickles it without
      limits);
    * every place the metadata points at must be a byte range of a regular file directly
      in the folder, stored as written (no transform): DCP would otherwise open any path
      the metadata names (``/etc/passwd``, ``../other.distcp``);
    * files are opened without following links (:class:`_NoLinkFileSystem`).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        self.fs = _NoLinkFileSystem()

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        folder = Path(self.path)
        fd = open_folder(folder)
        try:
            sizes = _listing(fd, folder)
            if sizes[DCP_METADATA] > MAX_METADATA_BYTES:
                raise CheckpointCorruptError(
                    f"{folder / DCP_METADATA} has {sizes[DCP_METADATA]:,} bytes, more than DCP "
                    f"metadata takes ({MAX_METADATA_BYTES:,}); it is not read"
                )
            member = _open_member(fd, DCP_METADATA, folder)
        finally:
            os.close(fd)
        with os.fdopen(member, "rb") as handle:
            data = handle.read(MAX_METADATA_BYTES + 1)
        try:
            metadata = _MetadataUnpickler(io.BytesIO(data)).load()
        except UnsafeCheckpointError:
            raise
        except Exception as err:
            raise CheckpointCorruptError(f"unreadable DCP metadata in {self.path}: {err}") from err
        if not isinstance(metadata, Metadata):
            raise CheckpointCorruptError(f"{self.path}/.metadata is not DCP metadata")
        _check_storage(metadata, sizes, folder)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _check_storage(metadata: Metadata, sizes: dict[str, int], folder: Path) -> None:
    """Refuse metadata whose byte ranges are not inside the folder's own shard files.

    Raises:
        CheckpointCorruptError: Naming the first range that is not.
    """
    storage = metadata.storage_data
    if not isinstance(storage, dict) or not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointCorruptError(f"{folder / DCP_METADATA} is not DCP metadata")
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise CheckpointCorruptError(
                f"{folder / DCP_METADATA} is not DCP metadata (its storage names "
                f"{type(index).__name__} -> {type(info).__name__})"
            )
        name = info.relative_path
        where = f"{folder / DCP_METADATA} places {index.fqn!r}"
        if not isinstance(name, str) or name in (DCP_METADATA, SKELETON_FILE) or name not in sizes:
            raise CheckpointCorruptError(
                f"{where} in {name!r}, which is not one of the checkpoint's shard files; "
                "nothing was read from it"
            )
        offset, length = info.offset, info.length
        if not (isinstance(offset, int) and isinstance(length, int)) or offset < 0 or length < 0:
            raise CheckpointCorruptError(f"{where} at a bad range ({offset!r}, {length!r})")
        if offset + length > sizes[name]:
            raise CheckpointCorruptError(
                f"{where} at bytes {offset}..{offset + length} of {name}, which has "
                f"{sizes[name]}; the shard is truncated: resume from another checkpoint"
            )
        if info.transform_descriptors:
            raise CheckpointCorruptError(
                f"{where} behind transforms {list(info.transform_descriptors)!r}; baton "
                "reads only shards stored as written"
            )


def read(
    path: str | os.PathLike,
    *,
    load_skeleton: Callable[[Path], Any],
    sections: tuple[str, ...] | None = None,
) -> dict:
    """Load a whole sharded checkpoint into one process, as the dict a ``.pth`` holds.

    Works with or without a process group (each process reads every part it needs on its
    own), so a checkpoint written by N ranks loads into 1 or M.

    Args:
        load_skeleton: Loads ``baton.pt`` safely (``weights_only``).
        sections: Only these top-level keys (``("meta",)``), reading only their tensors.

    Raises:
        CheckpointCorruptError: A part is missing or does not fit the metadata.
        UnsafeCheckpointError: DCP's metadata names a class it may not.
    """
    path = Path(path)
    files = _files_with_sizes(path)
    if files[SKELETON_FILE] > MAX_SKELETON_BYTES:
        raise CheckpointCorruptError(
            f"{path / SKELETON_FILE} has {files[SKELETON_FILE]:,} bytes, more than a sharded "
            f"checkpoint's non-tensor part takes ({MAX_SKELETON_BYTES:,}); it is not read"
        )
    skeleton = load_skeleton(path / SKELETON_FILE)
    if not isinstance(skeleton, dict):
        raise CheckpointCorruptError(f"{path / SKELETON_FILE} does not hold a checkpoint dict")
    if sections is not None:
        skeleton = {k: v for k, v in skeleton.items() if k in sections}
    metadata = SafeReader(str(path)).read_metadata()
    stored = metadata.state_dict_metadata
    stored_bytes: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        stored_bytes[index.fqn] = stored_bytes.get(index.fqn, 0) + info.length
    tensors: dict[str, torch.Tensor] = {}
    for key in tensor_keys(skeleton):
        if not isinstance(key, str):
            raise CheckpointCorruptError(f"{path / SKELETON_FILE} names a tensor by {key!r}")
        info = stored.get(key)
        if not isinstance(info, TensorStorageMetadata):
            raise CheckpointCorruptError(f"{path} has no tensor {key!r} in its DCP metadata")
        # Allocate no more than the shards hold: metadata that claims a tensor larger than
        # its stored bytes (a terabyte "weight" in a small file) is refused before any
        # memory is taken.
        shape, dtype = _shape_and_dtype(info, f"{path / DCP_METADATA} ({key!r})")
        claimed = math.prod(shape) * dtype.itemsize
        if claimed > stored_bytes.get(key, 0):
            raise CheckpointCorruptError(
                f"{path / DCP_METADATA} claims {claimed:,} bytes for {key!r} but its shards "
                f"hold {stored_bytes.get(key, 0):,}; it is not read"
            )
        tensors[key] = torch.empty(shape, dtype=dtype)
    if tensors:
        try:
            with _single_process_quiet():
                dcp.load(tensors, storage_reader=SafeReader(str(path)), no_dist=True)
        except (RuntimeError, ValueError, OSError, AssertionError) as err:
            raise CheckpointCorruptError(f"{path} cannot be read: {err}") from err
        except dcp.api.CheckpointException as err:
            raise CheckpointCorruptError(f"{path} cannot be read: {err}") from err
    return join(skeleton, tensors)


def _shape_and_dtype(
    info: TensorStorageMetadata, where: str
) -> tuple[tuple[int, ...], torch.dtype]:
    """The shape and dtype a tensor's metadata gives, checked: non-negative whole numbers
    and a torch dtype (a pickle of allowed classes may still hold any value in them).

    Raises:
        CheckpointCorruptError: Naming the bad value.
    """
    shape = tuple(info.size) if isinstance(info.size, (tuple, list)) else None
    dtype = getattr(getattr(info, "properties", None), "dtype", None)
    if shape is None or not all(type(n) is int and n >= 0 for n in shape):
        raise CheckpointCorruptError(f"{where} gives the shape {info.size!r}; it is not read")
    if not isinstance(dtype, torch.dtype):
        raise CheckpointCorruptError(f"{where} gives the dtype {dtype!r}; it is not read")
    return shape, dtype


def _files_with_sizes(path: Path) -> dict[str, int]:
    """Name -> size of a complete sharded checkpoint's files (see :func:`files_of`)."""
    fd = open_folder(path)
    try:
        return _listing(fd, path)
    finally:
        os.close(fd)


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
    fsync_dir(folder)
    if target.exists():
        remove(target)
    os.rename(folder, target)
    fsync_dir(target.parent)
    return size, sha


def remove(path: Path) -> None:
    """Delete a sharded checkpoint whole: renamed away first, so that a kill during the
    deletion leaves no half checkpoint under its name (the next run removes the rest)."""
    doomed = path.parent / f"{DELETING_PREFIX}{path.name}"
    if doomed.is_symlink():
        doomed.unlink()  # the link itself, never what it points at
    elif doomed.exists():
        shutil.rmtree(doomed)
    os.rename(path, doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed)
