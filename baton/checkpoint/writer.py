"""Writing a strategy's checkpoints and committing them to its experiment's store.

A bare file name goes into the experiment's ``checkpoints/`` folder, named for the newest
lineage; the file is written atomically (:mod:`baton.checkpoint.io`) and then committed
to the manifest, so a crash during the write leaves the previous checkpoint the latest.
A background save commits from a thread of its own once the bytes are on disk; one save
runs at a time. Before any byte is written, the operator's quotas are checked
(:mod:`baton.trust.quotas`): the experiment's committed files and bytes plus the new checkpoint,
and the free space the write leaves; a refusal writes nothing.
"""

import logging
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from baton.checkpoint import io, sharded
from baton.checkpoint.ref import CheckpointName, CheckpointRef
from baton.checkpoint.store import CheckpointStore
from baton.errors import CheckpointError
from baton.trust.quotas import Quotas, estimate_bytes


class CheckpointWriter:
    """The saves of one strategy (see the module docstring)."""

    def __init__(self, logger: logging.Logger, *, quotas: Quotas | None = None) -> None:
        self.logger = logger
        self._pending: Future | None = None
        self._thread: ThreadPoolExecutor | None = None
        # The operator's quotas, read once per experiment folder (their defaults depend
        # on its filesystem) unless given.
        self._quotas = quotas
        self._quotas_by_root: dict[Path, Quotas] = {}

    def target(self, store: CheckpointStore, filename: str) -> str:
        """Where ``filename`` is written: a bare name into the experiment's checkpoint
        folder, named for the newest lineage (``L2-epoch_0003.pth``), so that no lineage
        writes over another's committed file; an explicit path into that folder is
        refused if it would."""
        if _is_bare(filename):
            return str(store.target(filename))
        if not io.is_local(filename):
            return filename
        target = str(io.local_path(filename).absolute())
        store.check_target(target)
        return target

    def write(self, store: CheckpointStore, checkpoint: dict, target: str) -> CheckpointRef:
        """Write ``checkpoint`` to ``target`` and commit it.

        Raises:
            QuotaError: The write would exceed an operator's quota; nothing was written.
            ExperimentMovedError: The experiment's folder was moved or deleted while the
                run trained; nothing was written.
        """
        self.check_room(store, checkpoint, target)
        size, digest = io.save(checkpoint, target)
        return self._commit(store, target, checkpoint["meta"], size, digest)

    def write_in_background(self, store: CheckpointStore, checkpoint: dict, target: str) -> Future:
        """Snapshot ``checkpoint`` now, write and commit it in the background; a future of
        its reference (see ``SingleDeviceStrategy.save_checkpoint_async``).

        Raises:
            QuotaError: The write would exceed an operator's quota; nothing was started.
            ExperimentMovedError: The experiment's folder was moved or deleted while the
                run trained; nothing was started.
        """
        self.check_room(store, checkpoint, target)
        meta = checkpoint["meta"]
        writing = io.save_in_background(checkpoint, target)

        def commit() -> CheckpointRef:
            size, digest = writing.result()
            return self._commit(store, target, meta, size, digest)

        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="baton-commit")
        self._pending = self._thread.submit(commit)
        return self._pending

    def check_room(self, store: CheckpointStore, checkpoint: dict, target: str) -> None:
        """Refuse a write into an experiment folder that was moved or deleted while the run
        trained, and a local write that would take the experiment over its files or bytes
        quota, or leave less free disk than the operator's floor. The size is estimated
        from the checkpoint's tensors (:func:`baton.trust.quotas.estimate_bytes`).

        Raises:
            ExperimentMovedError: The experiment's folder is not the one the run locked.
            QuotaError: Naming the quota and where an operator changes it.
        """
        store.check_in_place()
        if not io.is_local(target):
            return
        quotas = self._quotas or self._quotas_by_root.get(store.root)
        if quotas is None:
            quotas = self._quotas_by_root[store.root] = Quotas.from_environment(folder=store.root)
        path = io.local_path(target)
        estimate = estimate_bytes(checkpoint)
        if store.owns(path):
            files, size = store.usage(replacing=str(path))
            quotas.check_save(
                name=path.name, estimate=estimate, committed_files=files, committed_bytes=size
            )
        quotas.check_free_space(path.parent, name=path.name, estimate=estimate)

    def wait(self) -> CheckpointRef | None:
        """Wait for a background save; its reference, or ``None`` if there was none or
        it failed (logged as an error: the state it was writing is still the live one,
        and the next save writes it)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        try:
            return pending.result()
        except (CheckpointError, OSError, CheckpointException) as err:
            self.logger.error(
                "%s; nothing was committed, the next checkpoint will hold this state", err
            )
            return None

    def _commit(
        self, store: CheckpointStore, target: str, meta: dict, size: int, digest: str
    ) -> CheckpointRef:
        metrics = {k: float(v) for k, v in (meta.get("metrics") or {}).items()}
        position = {"epoch": int(meta.get("epoch", 0)), "iter": int(meta.get("iter", 0))}
        # Only files of the experiment's own checkpoints/ folder enter its manifest (and
        # its newest lineage); a checkpoint written elsewhere is returned, not committed.
        if io.is_local(target) and store.owns(target):
            ref = store.commit(target, size=size, sha256=digest, metrics=metrics, **position)
        else:
            ref = CheckpointRef(uri=target, size=size, sha256=digest, metrics=metrics, **position)
        self.logger.info("saved checkpoint %s (%d bytes)", target, size)
        return ref


class ShardedCheckpointWriter(CheckpointWriter):
    """The saves of a data-parallel strategy: every rank calls each save with the same
    checkpoint dict (its replicated state).

    Into the experiment, a sharded checkpoint (:mod:`baton.checkpoint.sharded`): each rank
    writes its part into a temporary folder, rank 0 writes ``baton.pt``; once DCP's
    metadata is written (which DCP does only after every rank's part is), rank 0 renames
    the folder to its name, fsyncs, and commits it to the manifest. Every rank returns
    the same reference. A path or URI outside the experiment gets one ``.pth`` file,
    written by rank 0 (mmengine's ``DDPStrategy`` does the same).

    Args:
        process_group: The CPU-capable (gloo) group of checkpoint collectives, kept apart
            from training's: a background save's thread uses it while training goes on.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        process_group,
        quotas: Quotas | None = None,
    ) -> None:
        super().__init__(logger, quotas=quotas)
        self.group = process_group

    @property
    def _rank(self) -> int:
        return dist.get_rank()

    def _broadcast(self, value):
        """Rank 0's ``value`` on every rank (over the checkpoint group)."""
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def target(self, store: CheckpointStore, filename: str) -> str:
        """As :meth:`CheckpointWriter.target`, a bare name as a sharded folder
        (``epoch_0003.dcp``), decided by rank 0 for all."""
        if _is_bare(filename):
            name = CheckpointName.parse(filename)
            if name is not None:
                filename = str(name.as_sharded())
            elif not filename.endswith(sharded.SUFFIX):
                filename = filename.removesuffix(".pth") + sharded.SUFFIX
        return self._broadcast(super().target(store, filename) if self._rank == 0 else None)

    def write(self, store: CheckpointStore, checkpoint: dict, target: str) -> CheckpointRef:
        """Write ``checkpoint`` (every rank its part) and commit it (rank 0).

        Raises:
            QuotaError: The write would exceed an operator's quota; nothing was written
                (raised on every rank).
        """
        if not target.endswith(sharded.SUFFIX):
            return self._write_whole(store, checkpoint, target)
        folder = self._start(store, checkpoint, Path(target))
        sharded.write(
            checkpoint,
            folder,
            save_skeleton=_save_skeleton,
            process_group=self.group,
            coordinator=self._rank == 0,
        )
        ref = self._publish(store, folder, target, checkpoint["meta"]) if self._rank == 0 else None
        return self._broadcast(ref)

    def write_in_background(self, store: CheckpointStore, checkpoint: dict, target: str) -> Future:
        """Stage ``checkpoint`` to the CPU now (DCP's ``async_save``), write it from a
        thread, and commit it on rank 0 once every rank's part is written; a future of
        the reference on rank 0, of ``None`` on the others."""
        if not target.endswith(sharded.SUFFIX):
            done: Future = Future()
            done.set_result(self._write_whole(store, checkpoint, target))
            return done
        folder = self._start(store, checkpoint, Path(target))
        meta = checkpoint["meta"]
        writing = sharded.write(
            checkpoint,
            folder,
            save_skeleton=_save_skeleton,
            process_group=self.group,
            coordinator=self._rank == 0,
            background=True,
        )

        def commit() -> CheckpointRef | None:
            writing.result()
            if self._rank != 0:
                return None
            return self._publish(store, folder, target, meta)

        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="baton-commit")
        self._pending = self._thread.submit(commit)
        return self._pending

    def _start(self, store: CheckpointStore, checkpoint: dict, target: Path) -> Path:
        """Check room (rank 0, the verdict shared), and give every rank an empty writing
        folder."""
        refusal = None
        folder = sharded.writing_folder(target)
        if self._rank == 0:
            try:
                self.check_room(store, checkpoint, str(target))
            except CheckpointError as err:
                refusal = err
            else:
                if folder.exists():
                    shutil.rmtree(folder)  # a killed writer's; never committed
                folder.mkdir(parents=True)
        refusal = self._broadcast(refusal)
        if refusal is not None:
            raise refusal
        return folder

    def _publish(
        self, store: CheckpointStore, folder: Path, target: str, meta: dict
    ) -> CheckpointRef:
        size, digest = sharded.publish(folder, Path(target))
        return self._commit(store, target, meta, size, digest)

    def _write_whole(self, store: CheckpointStore, checkpoint: dict, target: str):
        ref = super().write(store, checkpoint, target) if self._rank == 0 else None
        return self._broadcast(ref)


def _is_bare(filename: str) -> bool:
    return "://" not in filename and "/" not in filename and filename not in ("", ".", "..")


def _save_skeleton(skeleton: dict, path: Path) -> None:
    io.save(skeleton, str(path))
