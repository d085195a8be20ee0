"""A configured pipeline, built and driven one step at a time: the library's way in.

:func:`build_pipeline` (:mod:`baton.run.live`) turns a validated
:class:`~baton.config.PipelineConfig` into a live :class:`Pipeline`. The step functions
(:mod:`baton.run.steps`: ``resume``, ``load_weights``, ``train_one_epoch``, ``evaluate``,
``save``, importable from here) are what the Prefect tasks call; :func:`restore` rebuilds a
pipeline at a position; :func:`run` chains the steps for a plain-Python run (tests,
benchmarks). When to evaluate and save, and where a run continues from, is decided in
:mod:`baton.run.control`.
"""

import logging

from baton.checkpoint import io
from baton.checkpoint.ref import CheckpointRef
from baton.config.schema import PipelineConfig
from baton.experiment.folder import Experiment
from baton.run import control, steps
from baton.run.control import find_resume_point, plan_resume
from baton.run.interrupt import StopRequest, TrainingInterrupted
from baton.run.live import Pipeline, build_pipeline, preload
from baton.run.own_process import (
    ForkRefused,
    TrainingProcess,
    fork_refused,
    training_process_setting,
)
from baton.run.ranks import RankedPipeline
from baton.run.steps import (
    load_weights,
    replay,
    resume,
    save,
    train_one_epoch,
)
from baton.trust.allowances import Trust, held_trust

# This module is the library's way into a pipeline (``from baton.run import pipeline as pl``):
# the live pipeline (baton.run.live), the steps (baton.run.steps) and the resume decision
# (baton.run.control) are importable from here.
__all__ = [
    "Pipeline",
    "RankedPipeline",
    "build_pipeline",
    "evaluate",
    "find_resume_point",
    "load_weights",
    "plan_resume",
    "preload",
    "replay",
    "restore",
    "restore_here",
    "resume",
    "run",
    "save",
    "save_epoch",
    "train_one_epoch",
    "train_until_stopped",
]

logger = logging.getLogger(__name__)


def restore(
    cfg: PipelineConfig,
    checkpoint: CheckpointRef | None,
    *,
    to_iter: int | None = None,
    evaluated: bool = False,
    experiment: Experiment | None = None,
    trust: Trust | None = None,
    own_process: bool = False,
) -> Pipeline | RankedPipeline:
    """A new pipeline at a run's position (:func:`restore_here`): in this process, or, with
    ``launcher.nproc`` above 1, in that many training processes this one drives
    (:class:`~baton.run.ranks.RankedPipeline`; close it to stop them).

    Args:
        own_process: On one device, train in a process forked from this one, away from
            this process's other threads (a flow's: :mod:`baton.run.own_process`), where
            a fork is safe; else here, with the reason logged.
    """

    def in_processes(group: TrainingProcess | None = None) -> RankedPipeline:
        trust_ = trust or Trust.from_environment()
        return RankedPipeline.start(
            cfg, checkpoint, to_iter=to_iter, evaluated=evaluated, trust=trust_, group=group
        )

    if own_process:
        training_process_setting()  # a bad setting is refused whatever the run's size
    if cfg.launcher.nproc > 1:
        return in_processes()
    refused = fork_refused() if own_process else None
    if own_process and refused is None:
        try:
            return in_processes(TrainingProcess())
        except ForkRefused as err:
            refused = str(err)
    pipeline = restore_here(
        cfg, checkpoint, to_iter=to_iter, evaluated=evaluated, experiment=experiment, trust=trust
    )
    if own_process:
        pipeline.trains_in = f"this process: {refused}"
    return pipeline


def restore_here(
    cfg: PipelineConfig,
    checkpoint: CheckpointRef | None,
    *,
    to_iter: int | None = None,
    evaluated: bool = False,
    experiment: Experiment | None = None,
    trust: Trust | None = None,
) -> Pipeline:
    """A new pipeline in this process at a run's position: resumed from ``checkpoint`` (or started from
    ``load_from``/scratch), then trained again up to iteration ``to_iter``, which is
    exact because data order and RNG states are part of the checkpoint.

    Args:
        evaluated: The run had also evaluated at ``to_iter`` (see :func:`replay`).
        experiment: The config's experiment, if the caller holds it already.
        trust: The operator's trust, if the caller read it already.

    Raises:
        RuntimeError: The checkpoint is past ``to_iter``.
    """
    resuming = io.load_meta(checkpoint.uri) if checkpoint is not None else None
    pipeline = build_pipeline(cfg, experiment, trust=trust, resuming=resuming)
    if checkpoint is not None:
        resume(pipeline, checkpoint)
    else:
        load_weights(pipeline)
    if to_iter is not None:
        if pipeline.strategy.iter > to_iter:
            raise RuntimeError(
                f"checkpoint {checkpoint.uri} is past the requested position "
                f"(iteration {pipeline.strategy.iter} > {to_iter})"
            )
        replay(pipeline, to_iter, validated=evaluated)
    return pipeline


# The steps a task runs on a live pipeline, in this process or in its ranks.


def train_until_stopped(
    pipeline: Pipeline | RankedPipeline, stop: StopRequest, *, progress=None
) -> dict[str, float]:
    """Train the current epoch (see :func:`baton.run.steps.train_until_stopped`).

    ``progress(running, step)`` is called as training goes (from another process, at most
    every ``rank_main.PROGRESS_EVERY_S``), and once more with ``final=True`` where the epoch
    ends or stops, so that a display can show where it ended.
    """
    try:
        if isinstance(pipeline, RankedPipeline):
            metrics = pipeline.train_until_stopped(stop, progress=progress)
        else:
            metrics = steps.train_until_stopped(pipeline, stop, progress=progress)
    except TrainingInterrupted:
        _last_progress(pipeline, progress, {})
        raise
    _last_progress(pipeline, progress, metrics)
    return metrics


def _last_progress(pipeline: Pipeline | RankedPipeline, progress, metrics: dict) -> None:
    if progress is not None:
        running = {key.removeprefix("train/"): value for key, value in metrics.items()}
        step = pipeline.strategy.step_in_epoch or pipeline.epoch_length
        progress(running, step, final=True)


def evaluate(pipeline: Pipeline | RankedPipeline) -> dict[str, float]:
    """Validation metrics (see :func:`baton.run.steps.evaluate`)."""
    if isinstance(pipeline, RankedPipeline):
        return pipeline.evaluate()
    return steps.evaluate(pipeline)


def save_epoch(
    pipeline: Pipeline | RankedPipeline, metrics: dict[str, float], *, background: bool = False
) -> CheckpointRef | None:
    """The checkpoint after an epoch (see :func:`baton.run.steps.save_epoch`)."""
    if isinstance(pipeline, RankedPipeline):
        return pipeline.save_epoch(metrics, background=background)
    return steps.save_epoch(pipeline, metrics, background=background)


class _InProcess:
    """The run's steps on the live pipeline (the plain-Python run; see baton.run.control)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.metrics: dict[str, float] = {}
        self.ref: CheckpointRef | None = None

    def position(self, pipeline: Pipeline) -> tuple[int, bool]:
        return pipeline.strategy.epoch, pipeline.finished

    def train(self, pipeline: Pipeline, epoch: int) -> Pipeline:
        if isinstance(pipeline, RankedPipeline):
            self.metrics = pipeline.train_until_stopped(StopRequest())
        else:
            self.metrics = train_one_epoch(pipeline)
        return pipeline

    def evaluate(self, pipeline: Pipeline, epoch: int) -> Pipeline:
        self.metrics.update(evaluate(pipeline))
        return pipeline

    def save(self, pipeline: Pipeline, epoch: int, background: bool) -> Pipeline:
        self.ref = save_epoch(pipeline, self.metrics, background=background) or self.ref
        return pipeline

    def report(self, pipeline: Pipeline) -> None:
        position = {"epoch": pipeline.strategy.epoch, "iter": pipeline.strategy.iter}
        pipeline.experiment.metrics.append("epoch", {**position, **self.metrics})
        logger.info("epoch %d: %s", pipeline.strategy.epoch, self.metrics)


def run(
    cfg: PipelineConfig, *, trust: Trust | None = None
) -> tuple[Pipeline, CheckpointRef | None]:
    """Train a whole pipeline in this process, resuming as the config says.

    The run's entry: it holds the operator's trust (``trust``, or read once at its first
    use) until it ends (:func:`~baton.trust.allowances.held_trust`).
    """
    with held_trust(trust):
        trust = Trust.from_environment()
        experiment = Experiment.of(cfg, trust)
        with experiment.lock():
            plan = control.plan_resume(cfg, experiment=experiment, trust=trust)
            pipeline = restore(cfg, plan.checkpoint, experiment=experiment, trust=trust)
            # every check passed: a refused run changed nothing
            plan.record(cfg, experiment, fork=pipeline.pending_fork is not None)
            run_steps = _InProcess(pipeline)
            try:
                control.train_to_horizon(cfg, pipeline, run_steps)
            finally:
                if isinstance(pipeline, RankedPipeline):
                    pipeline.close()  # the ranks end with the run
    return pipeline, run_steps.ref or plan.checkpoint
