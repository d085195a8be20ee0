"""``CheckpointStore``: the checkpoints of one experiment, as its manifest records them.

The store is the one object callers use; its parts live beside it:

- :mod:`baton.checkpoint.files`: the experiment folder's layout, and reading, hashing and
  listing only the store's own checkpoint files;
- :mod:`baton.checkpoint.committed`: the committed state (snapshot + journal) read,
  cached per process, repaired and appended to, and what a commit costs;
- :mod:`baton.checkpoint.lineage`: lineages, and which checkpoint is "latest";
- :mod:`baton.checkpoint.retention`: what rotation keeps (:class:`RetentionPolicy`);
- :mod:`baton.checkpoint.integrity`: checking every checkpoint at once, rebuild, repair;
- :mod:`baton.checkpoint.lock`: the experiment's lock.

A checkpoint exists for :meth:`CheckpointStore.latest` only once it is in the manifest
and its bytes still match the recorded size and sha256.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Literal

from baton.checkpoint import committed, integrity, manifest
from baton.checkpoint.files import ExperimentFiles
from baton.checkpoint.integrity import CheckedEntry, StoreCheck
from baton.checkpoint.lineage import Lineage, check_target, latest_in, lineages_of, parent_record
from baton.checkpoint.lock import check_in_place, experiment_lock
from baton.checkpoint.ref import CheckpointName, CheckpointRef
from baton.checkpoint.retention import (
    RetentionPolicy,
    delete_rotated,
    lineage_drops,
    rotation_drops,
)
from baton.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointOutsideError,
)

__all__ = ["CheckedEntry", "CheckpointStore", "Lineage", "RetentionPolicy", "StoreCheck"]

logger = logging.getLogger(__name__)


class CheckpointStore:
    """The committed checkpoints of one experiment folder.

    Args:
        root: The experiment folder (``work_dir/<experiment>``). Nothing is created
            until the first commit.
        retention: What rotation keeps within a lineage; by default everything.
    """

    def __init__(self, root: str | os.PathLike, *, retention: RetentionPolicy | None = None):
        self.root = Path(root).expanduser().absolute()
        self.retention = retention or RetentionPolicy()
        self._files = ExperimentFiles(self.root)

    @property
    def checkpoint_dir(self) -> Path:
        """Where checkpoint files live."""
        return self._files.checkpoint_dir

    @property
    def manifest_path(self) -> Path:
        """The manifest's snapshot file."""
        return self._files.manifest_path

    @property
    def journal_path(self) -> Path:
        """The manifest's journal: records committed since the snapshot."""
        return self._files.journal_path

    @property
    def entry_names(self) -> frozenset[str]:
        """The names of the store's own entries in the experiment folder (checkpoints/,
        the manifest and its journal, the lock)."""
        return self._files.entry_names

    def path_for(self, name: CheckpointName | str) -> Path:
        """Path of a checkpoint file with this name."""
        return self._files.path_for(name)

    def owns(self, path: str | os.PathLike) -> bool:
        """True when ``path`` is a file directly inside this store's checkpoint folder
        (reached through this root or another path to the same folder)."""
        return self._files.own_name(str(path)) is not None

    # reading --------------------------------------------------------------------------

    def _load(self) -> manifest.ManifestState:
        """The committed state (callers hold the manifest's thread lock). Never writes."""
        return committed.load(self._files)

    def _view(self) -> manifest.ManifestState:
        with committed.manifest_lock(self.root):
            return self._load()

    def _ref(self, entry: dict) -> CheckpointRef:
        return manifest.entry_ref(entry, self.checkpoint_dir)

    def check_in_place(self) -> None:
        """Refuse to write when this process holds the experiment's lock and the folder at
        :attr:`root` is no longer the one it locked (see :func:`baton.checkpoint.lock.
        check_in_place`): one ``stat``, done before every write of a run.

        Raises:
            ExperimentMovedError: The folder was moved or deleted while the run trained.
        """
        check_in_place(self.root)

    # queries --------------------------------------------------------------------------

    def list(self) -> list[CheckpointRef]:
        """Committed checkpoints of every lineage, in commit order (not verified)."""
        with committed.manifest_lock(self.root):
            state = self._load()
            return [self._ref(e) for e in state.entries.values()]

    def lineages(self) -> list[Lineage]:
        """Every lineage with its committed checkpoints, oldest lineage first."""
        with committed.manifest_lock(self.root):
            return lineages_of(self._load(), self.checkpoint_dir)

    def head(self) -> Lineage | None:
        """The newest lineage (the one commits go to and auto-resume continues)."""
        lineages = self.lineages()
        return lineages[-1] if lineages else None

    def verify(self, ref: CheckpointRef) -> None:
        """Check that the file still has the committed size and sha256 (a sharded
        checkpoint: its folder's digest, so a shard changed, missing or added fails).

        Raises:
            CheckpointNotFoundError: The file is gone.
            CheckpointCorruptError: Its size or checksum differs; a sharded checkpoint
                holding anything but regular files, or not whole.
            CheckpointOutsideError: The reference is not a regular file (or a sharded
                checkpoint's real folder) inside this store's ``checkpoints/`` folder (a
                path elsewhere, a link, a device).
        """
        name = self._files.own_name(ref.uri)
        if name is None:
            raise CheckpointOutsideError(
                f"{ref.uri} is not inside {self.checkpoint_dir}; the store verifies only its "
                "own checkpoints"
            )
        size, digest = self._files.hash_own(name, expected_size=ref.size)
        if size != ref.size or digest != ref.sha256:
            raise CheckpointCorruptError(
                f"{ref.uri} does not match its manifest entry: sha256 {digest[:12]}... "
                f"instead of {ref.sha256[:12]}... (damaged on disk?)"
            )

    def _problem(self, ref: CheckpointRef) -> str | None:
        try:
            self.verify(ref)
        except (CheckpointError, FileNotFoundError) as err:
            return str(err)
        return None

    def is_valid(self, ref: CheckpointRef) -> bool:
        """:meth:`verify` as a boolean, logging why a checkpoint is skipped."""
        problem = self._problem(ref)
        if problem is not None:
            logger.warning("skipping checkpoint: %s", problem)
        return problem is None

    def latest(self, lineage: int | None = None) -> CheckpointRef | None:
        """The newest valid commit of the newest lineage (or of ``lineage``); while that
        lineage has none, the newest valid one it descends from. ``None`` if there is none."""
        state = self._view()
        ref = latest_in(
            state, lambda entry: self.is_valid(self._ref(entry)), self.checkpoint_dir, lineage
        )
        if ref is None and lineage is None:
            logger.info("no valid checkpoint in %s", self.root)
        return ref

    def best(
        self,
        metric: str,
        mode: Literal["max", "min"] = "max",
        *,
        lineage: int | None = None,
    ) -> CheckpointRef | None:
        """The valid checkpoint with the best finite value of ``metric``, across all
        lineages (or within ``lineage``); ``None`` if none has it. NaN is never best."""
        state = self._view()
        scored = [
            e
            for e in state.entries.values()
            if manifest.finite(e["metrics"].get(metric)) and lineage in (None, e["lineage"])
        ]
        scored.sort(key=lambda e: e["metrics"][metric], reverse=(mode == "max"))
        for entry in scored:
            ref = self._ref(entry)
            if self.is_valid(ref):
                return ref
        return None

    def usage(self, *, replacing: str | None = None) -> tuple[int, int]:
        """Files and bytes of every committed checkpoint, all lineages, as the manifest
        records them; without the entry of ``replacing`` (a file about to be written
        again at the same position)."""
        name = self._files.own_name(replacing) if replacing is not None else None
        state = self._view()
        sizes = [
            e["size"]
            for e in state.entries.values()
            if name is None or e["path"] != f"{manifest.CHECKPOINTS}/{name}"
        ]
        return len(sizes), sum(sizes)

    def find(self, uri: str) -> CheckpointRef | None:
        """The committed entry for a file of this store, if the manifest has one."""
        name = self._files.own_name(uri)
        if name is None:
            return None
        state = self._view()
        seq = state.by_path.get(f"{manifest.CHECKPOINTS}/{name}")
        return self._ref(state.entries[seq]) if seq is not None else None

    def committed_at(self, filename: str, *, epoch: int, iter: int) -> CheckpointRef | None:
        """The newest lineage's valid checkpoint saved under the bare name ``filename`` at
        this position (``epoch``, ``iter``), if it committed one: a run that trains a
        stretch again (a retried task) does not commit it a second time."""
        with committed.manifest_lock(self.root):
            state = self._load()
            prefixed, _ = CheckpointName.split_lineage(filename)
            lineage = state.head or 1
            name = filename if prefixed != 1 else CheckpointName.in_lineage(filename, lineage)
            seq = state.by_path.get(f"{manifest.CHECKPOINTS}/{name}")
            entry = state.entries[seq] if seq is not None else None
        if entry is None or entry["lineage"] != lineage:
            return None
        if (entry["epoch"], entry["iter"]) != (epoch, iter):
            return None
        ref = self._ref(entry)
        return ref if self._problem(ref) is None else None

    def check(self) -> StoreCheck:
        """Every committed checkpoint verified, all from one committed state.

        A run that commits meanwhile may rotate files away; when a file fails, the
        manifest is read again and, if it changed, the check is done on the new state,
        so a checkpoint rotation removed is never reported as damaged.
        """
        return integrity.check(self._files, self._problem)

    # changes --------------------------------------------------------------------------

    def start_lineage(
        self,
        *,
        parent: CheckpointRef | None = None,
        reason: str = "fresh",
        run: str | None = None,
        config_hash: str | None = None,
        config: dict | None = None,
    ) -> int:
        """Start a new lineage: every later commit goes to it, and auto-resume continues it.

        Call it under the experiment's lock, before the run's first commit: for a fresh
        start (``parent=None``), a branch from an older checkpoint, or a fork that
        continues a checkpoint with a new config (``reason="fork"``, with the new
        ``config_hash``). Nothing is deleted: the other lineages keep their files.

        Args:
            parent: The checkpoint the new lineage continues; one of this store's
                committed checkpoints, or a file elsewhere (recorded, never read here).
            reason: Why it was started (shown by ``baton ckpt list``).
            run: The run that starts it (a flow run id), so a retry of that run can tell
                its own lineage.
            config_hash: The resolved config's hash, for a fork.
            config: The resolved config the lineage is started with (see
                :attr:`Lineage.config`).

        Returns:
            The new lineage's id.
        """
        own = self._files.own_name(parent.uri) if parent is not None else None
        with committed.manifest_lock(self.root):
            self.check_in_place()
            state = committed.writable(self._files)
            lineage_id = (state.head or 0) + 1
            record = {
                "id": lineage_id,
                "started": time.time(),
                "reason": reason,
                "parent": parent_record(state, parent, own),
                "run": run,
                "config_hash": config_hash,
            }
            if config is not None:
                record["config"] = config
            committed.append(self._files, state, {"op": "lineage", "lineage": record})
        logger.info("started lineage %d of %s (%s)", lineage_id, self.root.name, reason)
        return lineage_id

    def target(self, filename: str) -> Path:
        """Where a checkpoint saved under the bare name ``filename`` goes: its name in the
        newest lineage (``L2-epoch_0003.pth`` in lineage 2).

        Raises:
            CheckpointError: That file is another lineage's committed checkpoint.
        """
        with committed.manifest_lock(self.root):
            state = self._load()
            lineage = state.head or 1
            prefixed, _ = CheckpointName.split_lineage(filename)
            name = filename if prefixed != 1 else CheckpointName.in_lineage(filename, lineage)
            path = self.path_for(name)
            check_target(state, name, lineage)
        return path

    def check_target(self, path: str | os.PathLike) -> None:
        """Refuse to write over a file that another lineage committed.

        Raises:
            CheckpointError: ``path`` is another lineage's committed checkpoint.
        """
        name = self._files.own_name(str(path))
        if name is None:
            return
        with committed.manifest_lock(self.root):
            state = self._load()
            check_target(state, name, state.head or 1)

    def commit(
        self,
        uri: str,
        *,
        epoch: int,
        iter: int,
        size: int,
        sha256: str,
        metrics: dict[str, float] | None = None,
    ) -> CheckpointRef:
        """Record a fully written checkpoint in the newest lineage, then apply retention.

        ``uri`` is a file, or a sharded checkpoint's folder (``epoch_0003.dcp``, published
        by :func:`baton.checkpoint.sharded.publish`; ``size`` and ``sha256`` are its
        :func:`~baton.checkpoint.sharded.digest`), committed as one checkpoint. An entry
        for the same name is replaced (a checkpoint written again at the same position).
        Checkpoints dropped by retention are deleted after the commit is durable, a
        sharded one whole.

        Raises:
            CheckpointOutsideError: ``uri`` is not a file inside this store's folder.
            CheckpointCorruptError: ``uri`` is a sharded checkpoint that is not whole.
            CheckpointError: The file is another lineage's committed checkpoint.
            ExperimentMovedError: The folder was moved or deleted while the run trained.
        """
        name = self._files.own_name(uri)
        if name is None:
            raise CheckpointOutsideError(
                f"{uri} is not inside {self.checkpoint_dir}; only the experiment's own "
                "checkpoints are committed to its manifest"
            )
        self._files.check_complete(name)
        with committed.manifest_lock(self.root):
            self.check_in_place()
            state = committed.writable(self._files)
            if state.head is None:
                first = {"id": 1, "started": time.time(), "reason": "first", "parent": None}
                committed.append(self._files, state, {"op": "lineage", "lineage": first})
            lineage = state.head
            check_target(state, name, lineage)
            entry = {
                "seq": state.next_seq,
                "path": f"{manifest.CHECKPOINTS}/{name}",
                "lineage": lineage,
                "epoch": int(epoch),
                "iter": int(iter),
                "size": int(size),
                "sha256": sha256,
                "metrics": manifest.clean_metrics(metrics),
                "created": time.time(),
            }
            drop = rotation_drops(self.retention, state, entry)
            dropped = [state.entries[seq]["path"] for seq in drop]
            committed.append(self._files, state, {"op": "commit", "entry": entry, "drop": drop})
            delete_rotated(self._files, [PurePosixPath(p).name for p in dropped])
            return self._ref(entry)

    def prune(
        self, policy: RetentionPolicy, *, lineage: int | None = None, dry_run: bool = False
    ) -> list[CheckpointRef]:
        """Delete the committed checkpoints that ``policy`` does not keep, in every lineage
        (or in ``lineage``): an operator's command (``baton ckpt prune``), never a run's.

        Each lineage is rotated as its commits are (the same rule), and a checkpoint another
        lineage starts from stays. The manifest without them is written (a new snapshot,
        atomically) before any file is deleted. Call it under the experiment's lock.

        Args:
            dry_run: Say what would go; change nothing.

        Returns:
            The checkpoints dropped (or that would be), in commit order.

        Raises:
            CheckpointError: ``lineage`` is not one of the experiment's.
        """
        with committed.manifest_lock(self.root):
            state = self._load() if dry_run else committed.writable(self._files)
            if lineage is not None and lineage not in state.lineages:
                raise CheckpointError(
                    f"{self.root.name} has no lineage L{lineage}; its lineages are "
                    f"{', '.join(f'L{k}' for k in sorted(state.lineages)) or 'none'}"
                )
            drop: list[int] = []
            for lineage_id in sorted(state.lineages) if lineage is None else [lineage]:
                own = [e for e in state.entries.values() if e["lineage"] == lineage_id]
                drop += lineage_drops(policy, own, keep=state.parent_seqs())
            drop.sort()
            dropped = [self._ref(state.entries[seq]) for seq in drop]
            if dry_run or not drop:
                return dropped
            names = [PurePosixPath(state.entries[seq]["path"]).name for seq in drop]
            for seq in drop:
                state.drop(seq)
            committed.compact(self._files, state)
            delete_rotated(self._files, names)
        logger.info("pruned %d checkpoints of %s (%s)", len(drop), self.root.name, policy)
        return dropped

    def rebuild(self) -> list[CheckpointRef]:
        """Rebuild the manifest from the checkpoint files that load safely.

        The unreadable manifest is kept beside it as ``manifest.json.corrupt-<time>``
        (the journal likewise). Each file is loaded (``weights_only``) to check that it is
        a whole checkpoint; its position and metrics come from its ``meta``, its lineage
        from its name.
        """
        integrity.rebuild(self._files)
        return self.list()

    def repair(self) -> None:
        """Write what a reader found pending: migrate a manifest of the first format,
        cut a torn journal line, rebuild an unreadable manifest. Called by :meth:`lock`."""
        integrity.repair(self._files)

    @contextlib.contextmanager
    def lock(self, *, wait: bool = False) -> Iterator[None]:
        """Hold the experiment's exclusive lock (an ``flock`` on ``root/.lock``).

        Taking it removes what killed writers left and repairs the manifest (see
        :meth:`repair`), so that every reader after it sees a clean state.

        Args:
            wait: Block until the lock is free instead of failing at once.

        Raises:
            ExperimentLockedError: Another process holds it and ``wait`` is False.
        """
        with experiment_lock(self._files, wait=wait):
            self._files.remove_stale_temporaries()
            self.repair()
            yield
