"""Checking a store as a whole: every committed checkpoint verified against one committed
state, and the repairs (rebuild from the checkpoint files, pending fixes) that a run
holding the experiment's lock writes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from baton.checkpoint import committed, manifest
from baton.checkpoint.files import ExperimentFiles
from baton.checkpoint.lineage import Lineage, latest_in, lineages_of
from baton.checkpoint.ref import CheckpointRef


@dataclass(frozen=True)
class CheckedEntry:
    """One committed checkpoint as :meth:`CheckpointStore.check` found it."""

    ref: CheckpointRef
    lineage: int
    path: str
    problem: str | None


@dataclass(frozen=True)
class StoreCheck:
    """One committed state of the manifest, every checkpoint in it verified.

    Attributes:
        entries: The committed checkpoints in commit order, each with its problem (or None).
        lineages: All lineages, oldest first.
        outside: Manifest entries the store does not follow (``(what, why)`` pairs).
        latest: What :meth:`CheckpointStore.latest` returns for this state.
        problem: Why the manifest on disk could not be read as it is (the listing then
            comes from the checkpoint files), or ``None``.
        pending: A repair the next run holding the lock will write (a migration from the
            first format, cutting a torn journal line), or ``None``.
    """

    entries: list[CheckedEntry]
    lineages: list[Lineage]
    outside: list[tuple[str, str]]
    latest: CheckpointRef | None
    problem: str | None
    pending: str | None


def check(files: ExperimentFiles, problem: Callable[[CheckpointRef], str | None]) -> StoreCheck:
    """Every committed checkpoint checked by ``problem``, all from one committed state.

    A run that commits meanwhile may rotate files away; when a file fails, the manifest is
    read again and, if it changed, the check is done on the new state, so a checkpoint
    rotation removed is never reported as damaged.
    """
    problems: dict[tuple, str | None] = {}
    for _ in range(committed.READ_ATTEMPTS):
        with committed.manifest_lock(files.root):
            state = committed.load(files)
            key = (state.key, state.problem)
            entries = list(state.entries.values())
        for entry in entries:
            ident = (entry["path"], entry["sha256"], entry["size"])
            if ident not in problems:
                problems[ident] = problem(manifest.entry_ref(entry, files.checkpoint_dir))
        failing = any(problems[(e["path"], e["sha256"], e["size"])] for e in entries)
        if not failing:
            break
        with committed.manifest_lock(files.root):
            again = committed.load(files)
            if (again.key, again.problem) == key:
                break

    def problem_of(entry: dict) -> str | None:
        return problems[(entry["path"], entry["sha256"], entry["size"])]

    return StoreCheck(
        entries=[
            CheckedEntry(
                manifest.entry_ref(e, files.checkpoint_dir), e["lineage"], e["path"], problem_of(e)
            )
            for e in entries
        ],
        lineages=lineages_of(state, files.checkpoint_dir),
        outside=[(o["what"], o["problem"]) for o in state.outside],
        latest=latest_in(state, lambda e: problem_of(e) is None, files.checkpoint_dir),
        problem=state.problem,
        pending=state.pending,
    )


def rebuild(files: ExperimentFiles) -> None:
    """Rebuild the manifest from the checkpoint files that load safely, keeping the
    unreadable files beside it (see :func:`baton.checkpoint.committed.set_aside`)."""
    with committed.manifest_lock(files.root):
        state = committed.state_from_files(files, "rebuild requested")
        committed.set_aside(files, "rebuild requested")
        state.problem = None
        committed.compact(files, state)


def repair(files: ExperimentFiles) -> None:
    """Write what a reader found pending: migrate a manifest of the first format, cut a
    torn journal line, rebuild an unreadable manifest."""
    with committed.manifest_lock(files.root):
        state = committed.load(files)
        # An experiment with no manifest yet has nothing to repair: its first commit
        # writes the manifest (a run refused before that leaves none behind).
        unborn = not os.path.lexists(files.manifest_path) and not os.path.lexists(
            files.journal_path
        )
        if state.problem is not None or (state.pending is not None and not unborn):
            committed.writable(files)
