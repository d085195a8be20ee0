"""Lineages: the chains of runs in one experiment, read from its committed state.

**Lineages.** Every checkpoint belongs to a lineage: a chain of runs that continue each
other. A run that resumes automatically continues the newest lineage its config may
continue (:func:`baton.run.control.find_resume_point`); a fresh start
(``resume: never``), a resume from an older checkpoint (a branch) and a fork with a new
config start a new one (:meth:`baton.checkpoint.store.CheckpointStore.start_lineage`).
"Latest" is the newest commit of the newest lineage (or, while that lineage has none yet,
the checkpoint it started from). Rotation acts within the committing lineage and never
deletes the checkpoint just committed, a checkpoint another lineage starts from, or
another lineage's files (:mod:`baton.checkpoint.retention`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from baton.checkpoint import manifest
from baton.checkpoint.ref import CheckpointRef
from baton.errors import CheckpointError


@dataclass(frozen=True)
class Lineage:
    """A chain of runs that continue each other, and the checkpoints they committed.

    Attributes:
        id: 1, 2, ... in the order lineages were started; the highest is the newest.
        started: When it was started (seconds since the epoch).
        reason: ``first``, ``fresh`` (``resume: never``), ``branch`` (resumed from an
            older checkpoint), ``fork`` (a new config from a checkpoint), ``migrated`` or
            ``rebuilt``.
        parent: The committed checkpoint it starts from, if it is in this store.
        parent_outside: The file it starts from when that is not one of this store's
            checkpoints (recorded, never read by the store).
        run: The run that started it, when the caller named one.
        config_hash: The config it was started with, when the caller gave one.
        config: That resolved config itself, when the caller gave it: auto-resume compares
            it with a run's config without loading a checkpoint (the keys that change the
            run stay the same along a lineage: changing one forks a new lineage).
        checkpoints: Its committed checkpoints in commit order.
    """

    id: int
    started: float
    reason: str
    parent: CheckpointRef | None = None
    parent_outside: str | None = None
    run: str | None = None
    config_hash: str | None = None
    checkpoints: tuple[CheckpointRef, ...] = ()
    config: dict | None = None


def lineages_of(state: manifest.ManifestState, checkpoint_dir: Path) -> list[Lineage]:
    """Every lineage of ``state`` with its committed checkpoints, oldest lineage first."""
    members: dict[int, list[CheckpointRef]] = {k: [] for k in state.lineages}
    for entry in state.entries.values():
        members.setdefault(entry["lineage"], []).append(manifest.entry_ref(entry, checkpoint_dir))
    out = []
    for lineage_id in sorted(members):
        raw = state.lineages.get(lineage_id) or {"started": 0.0, "reason": "", "parent": None}
        parent, outside = None, None
        if raw["parent"] and "seq" in raw["parent"]:
            entry = state.entries.get(int(raw["parent"]["seq"]))
            parent = manifest.entry_ref(entry, checkpoint_dir) if entry else None
            outside = None if entry else f"checkpoint #{raw['parent']['seq']} (gone)"
        elif raw["parent"]:
            outside = str(raw["parent"].get("uri"))
        out.append(
            Lineage(
                id=lineage_id,
                started=raw["started"],
                reason=raw["reason"],
                parent=parent,
                parent_outside=outside,
                run=raw.get("run"),
                config_hash=raw.get("config_hash"),
                checkpoints=tuple(members[lineage_id]),
                config=raw.get("config") if isinstance(raw.get("config"), dict) else None,
            )
        )
    return out


def latest_in(
    state: manifest.ManifestState,
    valid: Callable[[dict], bool],
    checkpoint_dir: Path,
    lineage: int | None = None,
) -> CheckpointRef | None:
    """The newest ``valid`` entry of ``lineage`` (by default the newest lineage); while that
    lineage has none, the newest valid one it descends from (through its parents). ``None``
    if there is none."""
    lineage = state.head if lineage is None else lineage
    limit, seen = math.inf, set()
    while lineage is not None and lineage not in seen:
        seen.add(lineage)
        for entry in reversed(state.entries.values()):
            if entry["lineage"] == lineage and entry["seq"] <= limit and valid(entry):
                return manifest.entry_ref(entry, checkpoint_dir)
        parent = (state.lineages.get(lineage) or {}).get("parent") or {}
        if "seq" not in parent or "lineage" not in parent:
            return None
        lineage, limit = int(parent["lineage"]), int(parent["seq"])
    return None


def parent_record(
    state: manifest.ManifestState, parent: CheckpointRef | None, own_name: str | None
) -> dict | None:
    """How a new lineage records where it starts: the committed entry's ``seq`` when
    ``parent`` is one (``own_name`` its file name in the store), else the file itself."""
    if parent is None:
        return None
    seq = state.by_path.get(f"{manifest.CHECKPOINTS}/{own_name}") if own_name else None
    if seq is not None and state.entries[seq]["sha256"] == parent.sha256:
        return {"seq": seq, "lineage": state.entries[seq]["lineage"]}
    return {
        "uri": parent.uri,
        "sha256": parent.sha256,
        "epoch": parent.epoch,
        "iter": parent.iter,
    }


def check_target(state: manifest.ManifestState, name: str, lineage: int) -> None:
    """Refuse to let ``lineage`` write over the checkpoint file ``name`` of another lineage.

    Raises:
        CheckpointError: ``name`` is another lineage's committed checkpoint.
    """
    seq = state.by_path.get(f"{manifest.CHECKPOINTS}/{name}")
    if seq is not None and state.entries[seq]["lineage"] != lineage:
        raise CheckpointError(
            f"{name} is a committed checkpoint of lineage {state.entries[seq]['lineage']}; "
            f"lineage {lineage} does not overwrite it. Save under another name"
        )
