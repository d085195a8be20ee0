"""The steps of a pipeline, each on a live :class:`~baton.run.live.Pipeline`: resume from a
checkpoint or start from ``load_from`` weights, train an epoch (or up to an iteration),
evaluate, save, and replay a run up to a position.

Each step runs with the pipeline's own random generators (see
:class:`~baton.randomness.TrainingGenerators`). The Prefect tasks call these one at a
time; :func:`baton.run.pipeline.run` chains them in one process. When to evaluate and save is
decided in :mod:`baton.run.control`.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from baton.checkpoint import io
from baton.checkpoint.ref import CheckpointName, CheckpointRef
from baton.config.schema import PipelineConfig
from baton.errors import CheckpointMismatchError, ConfigError, TrainingDivergedError
from baton.run import control, loop, resume_policy
from baton.run.interrupt import StopRequest, TrainingInterrupted
from baton.run.live import Pipeline

logger = logging.getLogger(__name__)

T = TypeVar("T")

# ``meta`` key of the running train metrics in a checkpoint taken inside an epoch.
RUNNING_METRICS_KEY = "train_running"
# ``meta`` key of the forks in a checkpoint's ancestry, oldest first.
FORKS_KEY = "forks"


def _with_training_generators(step: Callable[..., T]) -> Callable[..., T]:
    """Run a pipeline step with the pipeline's own random generators (see
    :class:`~baton.randomness.TrainingGenerators`): datasets and models may draw from
    the global ones, and nothing outside the run's steps shifts what they draw."""

    @functools.wraps(step)
    def run_step(pipeline: Pipeline, *args, **kwargs) -> T:
        with pipeline.rng.active():
            return step(pipeline, *args, **kwargs)

    return run_step


def _check_architecture(cfg: PipelineConfig, source: str):
    expected = cfg.architecture_hash

    def callback(checkpoint: dict) -> None:
        meta = checkpoint.get("meta") or {}
        found = meta.get("architecture_hash")
        if found is not None and found != expected:
            saved_model = (meta.get("config") or {}).get("model")
            raise CheckpointMismatchError(
                f"{source} was trained with a different model ({saved_model}) than the "
                f"config's ({cfg.model_dump(mode='json')['model']}); resume with the "
                "original model section, or start a new experiment (or resume: never)"
            )

    return callback


@_with_training_generators
def resume(pipeline: Pipeline, ref: CheckpointRef) -> None:
    """Restore the pipeline from a checkpoint, checking first that it continues this run.

    Before anything is loaded, the checkpoint's config is compared with this one key by
    key (:mod:`baton.run.resume_policy`): keys that are free to change apply; a change of a
    key that changes the run is refused, unless the config forks (``fork: true``), in
    which case the run continues from the checkpoint as the new config would have it at
    that point, and the fork is recorded in every checkpoint it writes.

    The file is read once, and the bytes loaded are checked against ``ref``'s size and
    sha256. A checkpoint saved without optimizer state (``checkpoint.save_optimizer:
    false``) resumes with a fresh optimizer, and says so: that run does not continue as
    an uninterrupted one would.

    Raises:
        ResumeConfigError: The configs differ in keys that change the run (and the config
            does not fork), or in the model or starting weights (never resumable).
        CheckpointCorruptError: The file is not the one ``ref`` names any more.
    """
    strategy = pipeline.strategy
    check = resume_policy.ResumeCheck(
        pipeline.config,
        strategy,
        ref,
        epoch_length=pipeline.epoch_length,
        max_iters=pipeline.max_iters,
    )
    check_architecture = _check_architecture(pipeline.config, ref.uri)

    def callback(raw: dict) -> None:
        check(raw)
        check_architecture(raw)

    with io.expect_bytes(ref.uri, ref.size, ref.sha256):
        checkpoint = strategy.load_checkpoint(ref.uri, map_location="default", callback=callback)
    with_optimizer = "optimizer" in checkpoint
    if not with_optimizer:
        logger.warning(
            "%s holds no optimizer state (saved with checkpoint.save_optimizer: false): the "
            "optimizer starts fresh, so this run does not continue exactly as an "
            "uninterrupted one would",
            ref.uri,
        )
    strategy.restore(checkpoint, source=ref.uri, resume_optimizer=with_optimizer)
    _continue_run(pipeline, checkpoint.get("meta") or {}, check)


def _continue_run(pipeline: Pipeline, meta: dict, check: resume_policy.ResumeCheck) -> None:
    """Take over what the resumed run recorded (history, running metrics, forks, the
    plateau schedulers' last epoch), then apply a fork."""
    strategy = pipeline.strategy
    pipeline.history = list(meta.get("history") or [])
    # Saved after that epoch's validation (its metrics say so): the plateau schedulers'
    # state already holds it.
    if strategy.step_in_epoch == 0 and any(k.startswith("val/") for k in meta.get("metrics") or {}):
        pipeline.scored_epoch = strategy.epoch
    pipeline.forks = list(meta.get(FORKS_KEY) or [])
    pipeline.meter = loop.new_meter(strategy)
    running = meta.get(RUNNING_METRICS_KEY)
    if strategy.step_in_epoch and running and strategy.rank == 0:
        pipeline.meter.load_state_dict(running)  # the totals of every process, once
    if check.horizon_move is not None:
        check.horizon_move.retake_steps(
            strategy.param_schedulers, _plateau_view(meta.get("metrics") or {})
        )
    if check.fork is not None:
        resume_policy.fast_forward_schedulers(strategy, pipeline.epoch_length)
        pipeline.forks.append(check.fork)
        pipeline.pending_fork = check
        logger.warning(
            "forked %s from %s at epoch %d: %s",
            pipeline.config.experiment_name,
            check.fork["from"],
            strategy.epoch,
            "; ".join(map(str, check.fork_changes)),
        )
    # The data order follows the seed in effect, which a resume may have changed.
    pipeline.train_loader.seed = strategy.seed
    if pipeline.val_loader is not None:
        pipeline.val_loader.seed = strategy.seed


@_with_training_generators
def load_weights(pipeline: Pipeline) -> None:
    """Load ``load_from`` weights (a fresh start from pretrained weights)."""
    spec = pipeline.config.load_from
    if spec is not None:
        pipeline.strategy.load_checkpoint(
            control.checked_checkpoint(pipeline.experiment, spec.uri, "load_from"),
            strict=spec.strict,
            revise_keys=[tuple(pair) for pair in spec.revise_keys],
        )


@_with_training_generators
def train_one_epoch(
    pipeline: Pipeline,
    *,
    on_iteration=None,
    stop_at: int | None = None,
    save_iterations: bool = True,
) -> dict[str, float]:
    """Train the current epoch (or its rest) and return ``train/*`` metrics: the epoch's
    running means and ``train/lr``, the first parameter group's learning rate after the
    epoch's last iteration (before the epoch's own schedulers step).

    Args:
        on_iteration: Called with the running metrics after every iteration.
        stop_at: Stop at this iteration instead of the horizon (to replay a run up to
            a known position).
        save_iterations: Write the ``checkpoint.interval_iters`` checkpoints; a replay
            passes False (the run it replays committed them already).
    """
    strategy = pipeline.strategy
    interval = pipeline.config.checkpoint.interval_iters if save_iterations else None
    if strategy.step_in_epoch == 0:
        pipeline.meter = loop.new_meter(strategy)
    lr = [_learning_rate(strategy)]

    def hook(running: dict) -> None:
        # after the iteration's schedulers stepped, before the epoch's: the same value
        # whether the epoch ran in one piece or was resumed inside
        lr[0] = _learning_rate(strategy)
        if (
            interval
            and strategy.iter % interval == 0
            and strategy.step_in_epoch < pipeline.epoch_length
            and not _committed_here(pipeline, CheckpointName.for_iter(strategy.iter))
        ):
            save(
                pipeline,
                {f"train/{k}": v for k, v in running.items()},
                name=CheckpointName.for_iter(strategy.iter),
            )
        if on_iteration is not None:
            on_iteration(running)

    metrics = loop.train_epoch(
        strategy,
        pipeline.train_loader,
        loss_fn=pipeline.loss_fn,
        max_iters=pipeline.max_iters if stop_at is None else min(stop_at, pipeline.max_iters),
        on_iteration=hook,
        meter=pipeline.meter,
    )
    result = {f"train/{k}": v for k, v in metrics.items()}
    if lr[0] is not None:
        result["train/lr"] = lr[0]
    return result


def _learning_rate(strategy) -> float | None:
    """The learning rate of the optimizer's first parameter group, if it has one."""
    wrapper = getattr(strategy, "optim_wrapper", None)
    groups = getattr(getattr(wrapper, "optimizer", None), "param_groups", None)
    return float(groups[0]["lr"]) if groups else None


def _committed_here(pipeline: Pipeline, name: CheckpointName) -> bool:
    """Whether the run's lineage committed ``name`` at the current position already: a
    retried task trains its epoch again from the epoch's start (exactly, so the state is
    the one committed), and writing it again would commit an older position after newer
    ones. A fork not yet recorded has no checkpoint of its own."""
    if pipeline.pending_fork is not None:
        return False
    strategy = pipeline.strategy
    found = strategy.checkpoints.committed_at(str(name), epoch=strategy.epoch, iter=strategy.iter)
    return found is not None


def train_until_stopped(pipeline: Pipeline, stop: StopRequest, *, progress=None) -> dict:
    """Train the current epoch (or its rest) as :func:`train_one_epoch` does, logging the
    running metrics to ``metrics.jsonl`` every ``train.log_interval`` iterations.

    After each iteration ``stop`` is checked: when termination was requested, an
    iteration checkpoint is written and committed first, then
    :class:`~baton.run.interrupt.TrainingInterrupted` goes on with it as ``checkpoint``.

    Args:
        progress: Called with the running metrics and the iterations done in the epoch.
    """
    strategy = pipeline.strategy
    log_interval = pipeline.config.train.log_interval

    def on_iteration(running: dict) -> None:
        if strategy.iter % log_interval == 0:
            # Read on every rank (a collective with several processes), written by one.
            record = {"iter": strategy.iter, **{f"train/{k}": v for k, v in running.items()}}
            if strategy.rank == 0:
                pipeline.experiment.metrics.append("iteration", record)
        if progress is not None:
            progress(running, strategy.step_in_epoch or pipeline.epoch_length)
        stop.check()

    try:
        return train_one_epoch(pipeline, on_iteration=on_iteration)
    except TrainingInterrupted as interrupted:
        interrupted.checkpoint = save(pipeline, {}, name=CheckpointName.for_iter(strategy.iter))
        raise


@_with_training_generators
def evaluate(pipeline: Pipeline) -> dict[str, float]:
    """Metrics on the validation data (``val/*``); they also step the plateau schedulers.

    As mmengine's ``ParamSchedulerHook.after_val_epoch`` does, each ``ReduceOnPlateau*``
    scheduler is stepped with the metrics after the validation that follows a training
    epoch, once per epoch. Its ``monitor`` names a metric as mmengine's configs do
    (``loss``, ``accuracy``: baton's ``val/loss``, ``val/accuracy``) or by baton's key.
    """
    if pipeline.val_loader is None:
        return {}
    metrics = loop.evaluate(pipeline.strategy, pipeline.val_loader, loss_fn=pipeline.loss_fn)
    metrics = {f"val/{k}": v for k, v in metrics.items()}
    _step_plateau_schedulers(pipeline, metrics)
    return metrics


def _plateau_schedulers(pipeline: Pipeline) -> list:
    schedulers = getattr(pipeline.strategy, "param_schedulers", [])
    return [s for s in schedulers if s.by_epoch and getattr(s, "need_val_args", False)]


def _step_plateau_schedulers(pipeline: Pipeline, metrics: dict[str, float]) -> None:
    strategy = pipeline.strategy
    schedulers = _plateau_schedulers(pipeline)
    after_an_epoch = strategy.epoch > 0 and strategy.step_in_epoch == 0
    if not schedulers or not after_an_epoch or pipeline.scored_epoch == strategy.epoch:
        return
    named = _plateau_view(metrics)
    for scheduler in schedulers:
        scheduler.step(named)
    pipeline.scored_epoch = strategy.epoch


def _plateau_view(metrics: dict[str, float]) -> dict[str, float]:
    """The validation metrics as a plateau scheduler's ``monitor`` names them: mmengine's
    names (``loss``) and baton's (``val/loss``)."""
    val = {k: v for k, v in metrics.items() if k.startswith("val/")}
    return {**{k.removeprefix("val/"): v for k, v in val.items()}, **val}


def replay(pipeline: Pipeline, stop_at: int, *, validated: bool = False) -> None:
    """Train a resumed pipeline again up to iteration ``stop_at``, as the run did.

    Where a plateau scheduler follows the validations, the ones the run made on the way
    are made again (validation is deterministic), so the schedule matches too;
    ``validated`` says whether the run had also validated at ``stop_at``.
    """
    strategy = pipeline.strategy
    while strategy.iter < stop_at:
        train_one_epoch(pipeline, stop_at=stop_at, save_iterations=False)
        plan = control.plan_after_epoch(pipeline.config, strategy.epoch, pipeline.finished)
        if (
            _plateau_schedulers(pipeline)
            and strategy.step_in_epoch == 0
            and plan.evaluate
            and (strategy.iter < stop_at or validated)
        ):
            evaluate(pipeline)


def _refuse_diverged(pipeline: Pipeline, metrics: dict[str, float]) -> None:
    """Stop before a diverged state is saved: it would become the latest checkpoint, and
    every later run would resume from it."""
    bad = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not math.isfinite(v)}
    if not bad:
        return
    strategy = pipeline.strategy
    head = strategy.checkpoints.head()
    last = head.checkpoints[-1].uri if head and head.checkpoints else None
    values = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
    raise TrainingDivergedError(
        f"training diverged at epoch {strategy.epoch + (strategy.step_in_epoch > 0)}, "
        f"iteration {strategy.iter} ({values}); nothing was saved from this state and the "
        f"committed checkpoints are intact (the last one: {last or 'none'}). Lower the "
        "learning rate or set optim_wrapper.clip_grad, then continue from that checkpoint "
        "or start a new lineage with resume: never"
    )


def _check_best_metric(cfg: PipelineConfig, metrics: dict[str, float]) -> None:
    """``checkpoint.best_metric`` must be a metric the pipeline produces, or ``keep_best``
    would silently keep nothing. Which metrics exist is known once the first step of its
    kind (``val/`` or ``train/``) has run, so it is checked at the first save after it."""
    wanted = cfg.checkpoint.best_metric
    if wanted is None or wanted in metrics:
        return
    prefix = wanted.split("/", 1)[0] + "/"
    produced = sorted(k for k in metrics if k.startswith(prefix))
    if produced:
        raise ConfigError(
            f"checkpoint.best_metric {wanted!r} is not a metric this pipeline produces "
            f"({', '.join(produced)}); set checkpoint.best_metric to one of them"
        )


@_with_training_generators
def save(
    pipeline: Pipeline,
    metrics: dict[str, float],
    *,
    name: CheckpointName | None = None,
    background: bool = False,
) -> CheckpointRef | Future:
    """Write and commit a checkpoint of the current position, with its metrics.

    With ``background``, return a future of the reference at once (see
    ``SingleDeviceStrategy.save_checkpoint_async``).
    """
    strategy = pipeline.strategy
    cfg = pipeline.config
    _refuse_diverged(pipeline, metrics)
    _check_best_metric(cfg, metrics)
    if pipeline.pending_fork is not None:
        if strategy.rank == 0:  # one lineage for all of a run's processes
            pipeline.pending_fork.start_lineage()
        pipeline.pending_fork = None
    if name is None:
        add_to_history(pipeline, metrics)
        # Mid-epoch positions (a max_iters horizon, an emergency save) are named by iteration.
        name = (
            CheckpointName.for_iter(strategy.iter)
            if strategy.step_in_epoch
            else CheckpointName.for_epoch(strategy.epoch)
        )
    save_fn = strategy.save_checkpoint_async if background else strategy.save_checkpoint
    return save_fn(
        str(name),
        save_optimizer=cfg.checkpoint.save_optimizer,
        extra_ckpt={"meta": checkpoint_meta(pipeline, metrics)},
    )


def add_to_history(pipeline: Pipeline, metrics: dict[str, float]) -> None:
    """Record the current position's metrics in the run's history (what an epoch's save
    does; the history travels in every checkpoint's ``meta``)."""
    strategy = pipeline.strategy
    record = {"epoch": strategy.epoch, "iter": strategy.iter, **metrics}
    # Keyed by both: a fork to another epoch length reaches an iteration count again.
    position = (strategy.epoch, strategy.iter)
    pipeline.history = [h for h in pipeline.history if (h["epoch"], h["iter"]) != position] + [
        record
    ]


def checkpoint_meta(pipeline: Pipeline, metrics: dict[str, float]) -> dict:
    """The ``meta`` a pipeline's checkpoint adds to the strategy's own: metrics, config,
    history, the running metrics inside an epoch, the forks in its ancestry."""
    cfg = pipeline.config
    meta = {
        "metrics": metrics,
        "architecture_hash": cfg.architecture_hash,
        "config": cfg.model_dump(mode="json"),
        "experiment_name": cfg.experiment_name,
        "history": pipeline.history,
        # The batch every iteration trained on, across all processes: a resume at another
        # number of processes keeps it (baton.run.resume_policy.world_size).
        "global_batch_size": pipeline.train_loader.batch_size,
    }
    if pipeline.strategy.step_in_epoch:
        meta[RUNNING_METRICS_KEY] = pipeline.meter.state_dict()
    if pipeline.forks:
        meta[FORKS_KEY] = pipeline.forks
    return meta


def save_epoch(
    pipeline: Pipeline, metrics: dict[str, float], *, background: bool = False
) -> CheckpointRef | None:
    """The checkpoint after an epoch (:func:`baton.run.control.plan_after_epoch` says when and
    whether in the background): written and committed now, and returned; or started in
    the background, returning the newest checkpoint committed meanwhile (the previous
    background save's; ``None`` if there is none yet)."""
    if not background:
        return save(pipeline, metrics)
    committed = pipeline.strategy.wait_for_checkpoints()
    save(pipeline, metrics, background=True)
    return committed
