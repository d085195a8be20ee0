"""An experiment's folder: where each of its files lives, and the store's own checkpoint files.

Layout of an experiment's home (``work_dir/<experiment>/``)::

    checkpoints/epoch_0003.pth     the files of lineage 1
    checkpoints/L2-epoch_0001.pth  the files of lineage 2 (never the same file as lineage 1's)
    checkpoints/epoch_0004.dcp/    a sharded checkpoint: one folder, one checkpoint
    manifest.json                  snapshot: lineages and committed checkpoints (paths relative)
    manifest.journal               what was committed since the snapshot, one record a line
    .lock                          held by the process that trains the experiment

**Only its own files.** Manifest paths are relative to the experiment folder, so a moved
experiment resumes where it was and a copied one is independent. The store reads,
verifies and deletes only regular files directly inside its own ``checkpoints/`` folder,
and sharded checkpoints there (:mod:`baton.checkpoint.sharded`: real folders holding only
regular files), opened without following links; anything else a manifest names (an
absolute path, a ``..``, a link, a device) is reported and never followed or deleted.

:class:`ExperimentFiles` is the one owner of these paths: nobody else joins them. The rest
of the folder (metrics, logs, TensorBoard) is :class:`baton.experiment.Experiment`'s.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from baton.checkpoint import digests, io, manifest, sharded
from baton.checkpoint.ref import CheckpointName
from baton.errors import CheckpointCorruptError, CheckpointNotFoundError, CheckpointOutsideError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExperimentFiles:
    """The files of one experiment folder.

    Attributes:
        root: The experiment folder (``work_dir/<experiment>``), absolute.
    """

    root: Path

    @property
    def checkpoint_dir(self) -> Path:
        """Where checkpoint files live."""
        return self.root / manifest.CHECKPOINTS

    @property
    def manifest_path(self) -> Path:
        """The manifest's snapshot file."""
        return self.root / "manifest.json"

    @property
    def journal_path(self) -> Path:
        """The manifest's journal: records committed since the snapshot."""
        return self.root / "manifest.journal"

    @property
    def lock_path(self) -> Path:
        """The file the training process holds an ``flock`` on."""
        return self.root / ".lock"

    @property
    def entry_names(self) -> frozenset[str]:
        """The names of the store's own entries in the experiment folder."""
        paths = (self.checkpoint_dir, self.manifest_path, self.journal_path, self.lock_path)
        return frozenset(path.name for path in paths)

    def path_for(self, name: CheckpointName | str) -> Path:
        """Path of a checkpoint file with this name."""
        return self.checkpoint_dir / str(name)

    def own_name(self, uri: str) -> str | None:
        """The file name when ``uri`` is directly inside the checkpoint folder (reached
        through this root or another path to the same folder), else ``None``."""
        if not io.is_local(uri):
            return None
        path = io.local_path(uri).absolute()
        if path.name in ("", ".", ".."):
            return None
        if path.parent == self.checkpoint_dir:
            return path.name
        try:
            same = os.path.samestat(os.stat(path.parent), os.stat(self.checkpoint_dir))
        except OSError:
            return None
        return path.name if same else None

    def own_file_names(self) -> list[str]:
        """The checkpoints directly inside the checkpoint folder, sorted: its regular files,
        and its real folders named as sharded checkpoints (``epoch_0003.dcp``); none when
        the folder is missing or is not a real folder."""
        try:
            dir_fd = self.open_checkpoint_dir()
        except (FileNotFoundError, CheckpointOutsideError):
            return []
        try:
            return sorted(name for name in os.listdir(dir_fd) if _is_checkpoint_entry(dir_fd, name))
        finally:
            os.close(dir_fd)

    def open_checkpoint_dir(self) -> int:
        """A descriptor of the checkpoint folder, opened without following a link.

        Raises:
            FileNotFoundError: The folder does not exist.
            CheckpointOutsideError: It is a link or not a folder.
        """
        try:
            return os.open(self.checkpoint_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise
        except OSError as err:
            what = "a symbolic link" if os.path.islink(self.checkpoint_dir) else "not a folder"
            raise CheckpointOutsideError(
                f"{self.checkpoint_dir} is {what}; the store does not follow it (make it a "
                "real folder: the experiment folder itself may live on any disk)"
            ) from err

    def hash_own(self, name: str, expected_size: int | None = None) -> tuple[int, str]:
        """Size and sha256 of ``checkpoints/<name>``, opened without following a link: a
        regular file's bytes, or a sharded checkpoint's folder digest
        (:func:`baton.checkpoint.sharded.folder_digest`: a shard changed, missing or added
        changes it).

        Raises:
            CheckpointNotFoundError: The file is gone.
            CheckpointOutsideError: It is a link or a device.
            CheckpointCorruptError: Its size is not ``expected_size``; a sharded
                checkpoint holding anything but regular files, or incomplete.
        """
        path = self.checkpoint_dir / name
        dir_fd = self.open_checkpoint_dir()
        try:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
            except FileNotFoundError as err:
                raise CheckpointNotFoundError(f"{path} does not exist (deleted?)") from err
            except OSError as err:
                raise CheckpointOutsideError(
                    f"{path} is a symbolic link; the store does not follow it"
                ) from err
        finally:
            os.close(dir_fd)
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            try:
                return sharded.folder_digest(fd, path, expected_size=expected_size)
            finally:
                os.close(fd)
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointOutsideError(
                    f"{path} is not a regular file; the store does not read it"
                )
            if expected_size is not None and st.st_size != expected_size:
                raise CheckpointCorruptError(
                    f"{path} has {st.st_size} bytes but {expected_size} "
                    "were committed (truncated or overwritten)"
                )
            return digests.hash_file(path, handle)

    def check_complete(self, name: str) -> None:
        """Refuse to commit ``checkpoints/<name>`` when it is a sharded checkpoint's folder
        that is not whole (no DCP metadata or ``baton.pt``, or something other than
        regular files in it): a sharded checkpoint is committed only once every shard is
        written. A file is taken as its writer wrote it.

        Raises:
            CheckpointCorruptError: Naming what is missing or wrong.
        """
        path = self.checkpoint_dir / name
        if path.is_dir() and not path.is_symlink():
            sharded.files_of(path)

    def remove_stale_temporaries(self) -> None:
        """Delete what a killed writer left: temporary files, and the folders of a sharded
        checkpoint being written (``.writing-*``) or deleted (``.deleting-*``). Only
        called under the lock, before this run writes anything, so none of them belongs
        to a live write; a link is never followed (nor removed)."""
        for folder in (self.root, self.checkpoint_dir):
            if folder.is_dir() and not folder.is_symlink():
                for leftover in folder.glob(".*.tmp"):
                    if leftover.is_file() and not leftover.is_symlink():
                        leftover.unlink(missing_ok=True)
                        logger.info("removed %s, left by an interrupted write", leftover.name)
        if not self.checkpoint_dir.is_dir() or self.checkpoint_dir.is_symlink():
            return
        for prefix in (sharded.WRITING_PREFIX, sharded.DELETING_PREFIX):
            for leftover in self.checkpoint_dir.glob(f"{prefix}*"):
                if leftover.is_dir() and not leftover.is_symlink():
                    # rmtree removes the links inside a folder, never what they point at
                    shutil.rmtree(leftover)
                    logger.info("removed %s, left by an interrupted write", leftover.name)


def _is_checkpoint_entry(dir_fd: int, name: str) -> bool:
    """A regular file, or a real folder with a sharded checkpoint's name."""
    mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    if stat.S_ISREG(mode):
        return True
    parsed = CheckpointName.parse(name)
    return stat.S_ISDIR(mode) and parsed is not None and parsed.sharded
