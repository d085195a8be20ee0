"""Run control: what a training run does after each epoch, and where it continues from.

The Prefect flow (``baton.flows.train``, one task per step) and the plain-Python run
(:func:`baton.run.pipeline.run`) both drive training with :func:`train_to_horizon`, so the
decisions are written once:

- after each epoch, whether to evaluate, whether to save and whether that save may go on
  in the background (:func:`plan_after_epoch`); a rebuilt pipeline replays them
  (:func:`baton.run.steps.replay`);
- which checkpoint a run continues from, and which lineage its commits go to
  (:func:`plan_resume`), recorded only once every check has passed
  (:meth:`ResumePlan.record`).
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict

from baton.checkpoint import io
from baton.checkpoint.lineage import Lineage
from baton.checkpoint.ref import CheckpointRef
from baton.config.schema import PipelineConfig, Resume
from baton.errors import CheckpointError, CheckpointNotFoundError, MissingInputError
from baton.experiment.folder import Experiment
from baton.run.resume_policy.keys import RUN, START, ConfigChange, compare
from baton.trust.allowances import Trust

S = TypeVar("S")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochPlan:
    """What follows a training epoch."""

    evaluate: bool
    save: bool
    background: bool  # the save may be written while training goes on


def plan_after_epoch(cfg: PipelineConfig, epoch: int, finished: bool) -> EpochPlan:
    """Evaluate every ``train.val_interval`` epochs, save every ``checkpoint.interval``
    epochs, and both at the horizon; a save before the horizon goes to the background
    with ``checkpoint.async_save`` (the last one is waited for: the run ends with it)."""
    save = epoch % cfg.checkpoint.interval == 0 or finished
    return EpochPlan(
        evaluate=cfg.val_data is not None and (epoch % cfg.train.val_interval == 0 or finished),
        save=save,
        background=save and cfg.checkpoint.async_save and not finished,
    )


class Steps(Protocol[S]):
    """The steps of a run on a state ``S`` (a ``RunState`` in the flow, the live
    pipeline in a plain run). ``epoch`` is the 1-based epoch just trained."""

    def position(self, state: S) -> tuple[int, bool]:
        """Completed epochs, and whether the horizon is reached."""

    def train(self, state: S, epoch: int) -> S: ...

    def evaluate(self, state: S, epoch: int) -> S: ...

    def save(self, state: S, epoch: int, background: bool) -> S: ...

    def report(self, state: S) -> None: ...


def train_to_horizon(
    cfg: PipelineConfig,
    state: S,
    steps: Steps[S],
    *,
    before_epoch: Callable[[S], S] | None = None,
) -> S:
    """Train epoch by epoch to the horizon, evaluating and saving as planned.

    Args:
        before_epoch: Called before each epoch (the flow's check for a pending SIGTERM).
    """
    completed, finished = steps.position(state)
    while not finished:
        if before_epoch is not None:
            state = before_epoch(state)
        epoch = completed + 1
        state = steps.train(state, epoch)
        completed, finished = steps.position(state)
        plan = plan_after_epoch(cfg, completed, finished)
        if plan.evaluate:
            state = steps.evaluate(state, epoch)
        if plan.save:
            state = steps.save(state, epoch, plan.background)
        steps.report(state)
    return state


class NewLineage(BaseModel):
    """A lineage a run will start (see :class:`ResumePlan`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    reason: Literal["fresh", "branch"]
    parent: CheckpointRef | None = None  # the checkpoint it continues
    run: str | None = None  # the run that starts it, so that a retry of that run continues it


class ResumePlan(BaseModel):
    """Where a run continues from, and what it records once every check has passed.

    Deciding reads only. The checks that may still refuse the run come after (loading the
    checkpoint: the model, the resume policy, a safe load); only then does :meth:`record`
    write the experiment's retention (``experiment.json``, for a new experiment) and the new
    lineage, so that a refused run leaves the experiment as it found it. Small and frozen:
    it travels between tasks (``find-resume-point`` -> ``prepare``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    checkpoint: CheckpointRef | None = None
    lineage: NewLineage | None = None  # None: the run's commits go to the newest lineage

    def record(
        self, cfg: PipelineConfig, experiment: Experiment | None = None, *, fork: bool = False
    ) -> None:
        """Record the plan: the experiment's retention (:meth:`Experiment.fix_retention`)
        and the new lineage, if any. Call it under the experiment's lock, once the pipeline
        is restored from :attr:`checkpoint` (or built fresh), before the run's first commit.
        ``fork``: the restore forked (the resume policy found changes and the run forks), so
        a branch from an older checkpoint is recorded as the fork it is.

        Raises:
            RetentionConflictError: The experiment's retention changed meanwhile.
        """
        experiment = experiment or Experiment.of(cfg)
        experiment.fix_retention(cfg.checkpoint.retention())
        if self.lineage is not None:
            reason = "fork" if fork and self.lineage.reason == "branch" else self.lineage.reason
            experiment.store.start_lineage(
                parent=self.lineage.parent,
                reason=reason,
                run=self.lineage.run,
                config_hash=cfg.config_hash,
                config=_dump(cfg),
            )


def find_resume_point(
    cfg: PipelineConfig,
    *,
    run_id: str | None = None,
    experiment: Experiment | None = None,
    trust: Trust | None = None,
) -> CheckpointRef | None:
    """The checkpoint a run of ``cfg`` continues from (:func:`plan_resume`); writes nothing."""
    return plan_resume(cfg, run_id=run_id, experiment=experiment, trust=trust).checkpoint


def plan_resume(
    cfg: PipelineConfig,
    *,
    run_id: str | None = None,
    experiment: Experiment | None = None,
    trust: Trust | None = None,
) -> ResumePlan:
    """The checkpoint a run of ``cfg`` continues from, by its resume policy, and the lineage
    its commits will go to. Reads only: the run records the plan
    (:meth:`ResumePlan.record`) once the checkpoint is loaded and every check has passed.
    Call it under the experiment's lock.

    First the run is held to the experiment's retention (:meth:`Experiment.check_retention`):
    a run that asks for another is refused.

    - ``'auto'``: the newest valid checkpoint of the newest lineage *compatible with the
      run's config* (``None`` if there is none); the run continues that lineage. A
      lineage is compatible when resuming it would change no key that changes the run
      (``baton.run.resume_policy``): a fork with another seed or learning rate is skipped,
      and logged, so that it never changes what the original config resumes. When the
      compatible lineage is not the newest, the run branches from its newest checkpoint.
      When no lineage is compatible, the newest one is resumed and the resume refuses
      with the differences. With ``fork: true``, the newest lineage, as the fork says.
    - ``'never'``: ``None``. If the experiment already has checkpoints, a new lineage is
      started: the older lineages keep every file, and auto-resume continues the new
      lineage from then on.
    - a path: that checkpoint, which must exist. Unless it is the newest one, the run
      starts a new lineage from it (a branch).

    A retry of the run that started the newest lineage (the same ``run_id``: a Prefect
    flow run retried) continues that lineage instead of starting yet another.

    Raises:
        RetentionConflictError: The run asks for another retention than the experiment's.
        CheckpointNotFoundError: The named checkpoint does not exist.
        CheckpointCorruptError: The named committed checkpoint no longer verifies.
    """
    trust = trust or Trust.from_environment()
    experiment = experiment or Experiment.of(cfg, trust)
    experiment.check_retention(cfg.checkpoint.retention())
    store = experiment.store
    head = store.head()
    own_retry = run_id is not None and head is not None and head.run == run_id
    resume = Resume(cfg.resume)  # a config copied with model_copy may hold a plain string
    if resume.auto:
        if cfg.fork:
            return ResumePlan(checkpoint=store.latest())
        return _newest_compatible(cfg, experiment, run_id)
    if resume.never:
        if own_retry:
            return ResumePlan(checkpoint=store.latest())
        if head is None and run_id is None:
            return ResumePlan()  # an empty experiment: the first commit starts lineage 1
        if head is not None and not head.checkpoints and not (head.parent or head.parent_outside):
            return ResumePlan()  # the newest lineage is still empty and fresh: use it
        return ResumePlan(lineage=NewLineage(reason="fresh", run=run_id))
    uri = checked_checkpoint(experiment, resume.checkpoint, "resume checkpoint", trust)
    committed = store.find(uri) or store.find(resume.checkpoint)
    if committed is not None:
        store.verify(committed)
        if own_retry and _same(head.parent, committed):
            return ResumePlan(checkpoint=store.latest() or committed)
        if _same(store.latest(), committed):
            return ResumePlan(checkpoint=committed)
        branch = NewLineage(reason="branch", parent=committed, run=run_id)
        return ResumePlan(checkpoint=committed, lineage=branch)
    ref = CheckpointRef.of_file(uri)
    if own_retry and head.parent_outside == uri:
        return ResumePlan(checkpoint=store.latest() or ref)
    return ResumePlan(checkpoint=ref, lineage=NewLineage(reason="branch", parent=ref, run=run_id))


def _dump(cfg: PipelineConfig) -> dict:
    return cfg.model_dump(mode="json")


def _newest_compatible(
    cfg: PipelineConfig, experiment: Experiment, run_id: str | None
) -> ResumePlan:
    """Auto-resume: the newest checkpoint of the newest lineage whose config the run may
    continue without a fork (see :func:`find_resume_point`).

    A lineage's config is the one it was started with, when its record has it (no load);
    otherwise its newest checkpoint's ``meta.config``, read without its tensors, newest
    lineage first and only until one is compatible.
    """
    store = experiment.store
    lineages = store.lineages()
    current = _dump(cfg)
    skipped: list[str] = []
    for lineage in reversed(lineages):
        ref = store.latest(lineage.id)
        if ref is None and (lineage.checkpoints or lineage.parent or lineage.parent_outside):
            continue  # nothing valid left to resume: not a candidate
        changes = _changes(lineage, ref, current)
        if changes:
            skipped.append(f"L{lineage.id} ({lineage.reason}): {'; '.join(map(str, changes))}")
            continue
        for line in skipped:
            logger.warning(
                "auto-resume of %s skipped lineage %s (its config -> this run's); it continues L%d",
                experiment.name,
                line,
                lineage.id,
            )
        if lineage is lineages[-1]:
            return ResumePlan(checkpoint=ref)
        if ref is None:
            return ResumePlan(lineage=NewLineage(reason="fresh", run=run_id))
        return ResumePlan(
            checkpoint=ref, lineage=NewLineage(reason="branch", parent=ref, run=run_id)
        )
    # None compatible: the resume refuses, naming the differences.
    return ResumePlan(checkpoint=store.latest())


def _changes(lineage: Lineage, ref: CheckpointRef | None, current: dict) -> list[ConfigChange]:
    """What would change the run if it continued ``lineage`` (from ``ref``)."""
    saved = lineage.config
    if saved is None and ref is not None:
        try:
            saved = io.load_meta(ref.uri).get("config")
        except (CheckpointError, OSError) as err:
            logger.warning("could not read the config of %s: %s", ref.uri, err)
            return []  # the resume reads it again and reports the problem
    if not isinstance(saved, dict):
        return []  # no config recorded (not a baton pipeline's): resumed as before
    return [c for c in compare(saved, current) if c.kind in (RUN, START)]


def checked_checkpoint(
    experiment: Experiment, uri: str, what: str, trust: Trust | None = None
) -> str:
    """A checkpoint a config or a run names, refused unless it is a regular file in the
    experiment folder or an operator's root (of ``trust``, default: the environment's),
    or a URI of an allowed scheme.

    Raises:
        CheckpointNotFoundError: The file does not exist.
        UntrustedInputError: It is outside what the operator allows.
    """
    try:
        return (trust or Trust.from_environment()).check_checkpoint(
            uri, experiment_dir=Path(experiment.root), what=what
        )
    except MissingInputError as err:
        raise CheckpointNotFoundError(f"{what} {uri!r} does not exist") from err


def _same(a: CheckpointRef | None, b: CheckpointRef | None) -> bool:
    """The same file with the same bytes (metrics may hold NaN, which equals nothing)."""
    return a is not None and b is not None and (a.uri, a.sha256) == (b.uri, b.sha256)
