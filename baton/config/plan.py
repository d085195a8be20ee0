"""A config's plan against the operator's quotas: the horizon in iterations, and the
checkpoint files and bytes the run would keep at its peak.

Checked twice: at validation (:mod:`baton.config.checks`), where the epoch length is not
known yet and every count is a lower bound, and when a pipeline is built
(:mod:`baton.run.live`), with the real epoch length and the built model.
"""

import math

from torch import nn

from baton.config.schema import PipelineConfig
from baton.errors import QuotaError
from baton.trust.quotas import Quotas, checkpoint_estimate, state_bytes


def plan_problems(
    quotas: Quotas, cfg: PipelineConfig, epoch_length: int | None
) -> list[tuple[tuple, str]]:
    """``(key path, message)`` for a horizon over ``max_iterations`` and a checkpoint
    plan over the experiment's files quota; with ``epoch_length`` unknown (at
    validation) the counts are lower bounds, every epoch at least one iteration."""
    problems = []
    train = cfg.train
    if train.max_iters is not None:
        iterations, key = train.max_iters, ("train", "max_iters")
    else:
        iterations, key = train.max_epochs * (epoch_length or 1), ("train", "max_epochs")
    if iterations > quotas.max_iterations:
        at_least = "" if epoch_length or train.max_iters else "at least "
        problems.append(
            (
                key,
                quotas.refusal(
                    f"the run's horizon is {at_least}{iterations:,} iterations",
                    "max_iterations",
                    "train for fewer",
                ),
            )
        )
    files = peak_checkpoint_files(cfg, epoch_length)
    if files > quotas.max_experiment_files:
        problems.append(
            (
                ("checkpoint", "keep_last"),
                quotas.refusal(
                    f"the checkpoint plan keeps up to {files:,} files",
                    "max_experiment_files",
                    "set checkpoint.keep_last, or save less often (checkpoint.interval, "
                    "checkpoint.interval_iters)",
                ),
            )
        )
    return problems


def check_plan(
    quotas: Quotas, cfg: PipelineConfig, epoch_length: int, model: nn.Module | None = None
) -> None:
    """Refuse what :func:`plan_problems` finds with the real ``epoch_length``, and with
    the built ``model`` what :func:`plan_bytes_problem` finds.

    Raises:
        QuotaError: Every problem, each with its key path.
    """
    problems = plan_problems(quotas, cfg, epoch_length)
    if model is not None:
        message = plan_bytes_problem(quotas, cfg, state_bytes(model), epoch_length)
        if message:
            problems.append((("checkpoint",), message))
    if problems:
        raise QuotaError(
            "; ".join(f"{'.'.join(path)}: {message}" for path, message in problems),
            [message for _, message in problems],
        )


def plan_bytes_problem(
    quotas: Quotas, cfg: PipelineConfig, model_bytes: int, epoch_length: int | None
) -> str | None:
    """The refusal for a checkpoint plan whose files, each of about
    :func:`~baton.trust.quotas.checkpoint_estimate` bytes for a model of ``model_bytes``,
    exceed ``max_experiment_bytes``, else ``None``."""
    each = checkpoint_estimate(model_bytes, save_optimizer=cfg.checkpoint.save_optimizer)
    files = min(peak_checkpoint_files(cfg, epoch_length), quotas.max_experiment_files)
    if files * each <= quotas.max_experiment_bytes:
        return None
    return quotas.refusal(
        f"the checkpoint plan keeps up to {files:,} files of about {each:,} bytes each "
        f"({files * each:,} bytes)",
        "max_experiment_bytes",
        "set a smaller checkpoint.keep_last or use a smaller model",
    )


def checkpoint_saves(cfg: PipelineConfig, epoch_length: int | None) -> int:
    """How many checkpoints one run of ``cfg`` writes over its horizon: epoch saves every
    ``checkpoint.interval`` epochs and at the horizon, and ``checkpoint.interval_iters``
    saves inside epochs. With ``epoch_length`` unknown, a lower bound."""
    train, policy = cfg.train, cfg.checkpoint
    if epoch_length is None:
        if train.max_epochs is not None:
            return math.ceil(train.max_epochs / policy.interval)
        if policy.interval_iters and policy.interval == 1:
            # every multiple of interval_iters ends an iteration or an epoch checkpoint
            return max(train.max_iters // policy.interval_iters, 1)
        return 1
    if train.max_iters is not None:
        iterations = train.max_iters
        epochs = math.ceil(iterations / epoch_length)
    else:
        epochs = train.max_epochs
        iterations = epochs * epoch_length
    saves = math.ceil(epochs / policy.interval)
    if policy.interval_iters:
        step = policy.interval_iters
        at_epoch_ends = iterations // math.lcm(step, epoch_length)
        saves += iterations // step - at_epoch_ends
    return saves


def peak_checkpoint_files(cfg: PipelineConfig, epoch_length: int | None) -> int:
    """The most checkpoint files one run of ``cfg`` holds at once: every save with
    ``keep_last: null``, else the kept ones plus the one being written (rotation deletes
    only after a commit)."""
    saves = checkpoint_saves(cfg, epoch_length)
    policy = cfg.checkpoint
    if policy.keep_last is None:
        return saves
    return min(saves, policy.keep_last + policy.keep_best + 1)
