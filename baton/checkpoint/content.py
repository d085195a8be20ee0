"""What goes into a strategy's checkpoint, and how a loaded one is put back.

A checkpoint holds ``meta`` (position, seed, RNG states, accumulation window, config
hash, the caller's extra meta), ``state_dict`` (model weights), ``optimizer``,
``param_schedulers`` and, when saved inside an accumulation window, the gradients
gathered so far (mmengine drops them, so its resume there is not exact). The layout is
mmengine's, so each side reads the other's files. How the file is written and committed
is :mod:`baton.checkpoint.io` and :mod:`baton.checkpoint.writer`.
"""

import copy
import logging

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from baton import randomness
from baton.checkpoint import format as ckpt_format
from baton.errors import CheckpointMismatchError

# Top-level key of the gradients saved inside an accumulation window.
ACCUMULATED_GRADS_KEY = "accumulated_grads"


def build(
    strategy,
    save_optimizer: bool,
    save_param_scheduler: bool,
    extra_ckpt: dict | None,
    *,
    environment: dict | None = None,
) -> dict:
    """The checkpoint dict of a prepared strategy's current state (``extra_ckpt`` is
    copied, never changed; its ``meta`` joins the checkpoint's). ``environment`` is the
    strategy's fingerprint of the environment (``meta['environment']``)."""
    extra = copy.deepcopy(extra_ckpt) if extra_ckpt else {}
    wrapper = getattr(strategy, "optim_wrapper", None)
    meta = ckpt_format.make_meta(
        epoch=strategy.epoch,
        iter=strategy.iter,
        step_in_epoch=strategy.step_in_epoch,
        seed=strategy.seed,
        rng=randomness.capture_rng_state(),
        config_hash=strategy.config_hash,
        accumulation=(
            # max_counts: the horizon the last, shorter window was cut to (a resume
            # that moves the horizon needs it to tell whether it can be exact).
            {"inner_count": wrapper.inner_count, "max_counts": wrapper._max_counts}
            if wrapper
            else None
        ),
        extra_meta=extra.pop("meta", None),
        environment=environment,
    )
    meta["world_size"] = strategy.world_size
    model = strategy.unwrapped_model
    checkpoint: dict = {"meta": meta, "state_dict": ckpt_format.to_cpu(model.state_dict())}
    if save_optimizer and wrapper is not None:
        checkpoint["optimizer"] = ckpt_format.to_cpu(wrapper.state_dict())
    if save_param_scheduler and hasattr(strategy, "param_schedulers"):
        checkpoint["param_schedulers"] = [s.state_dict() for s in strategy.param_schedulers]
    if wrapper is not None and wrapper.in_window():
        checkpoint[ACCUMULATED_GRADS_KEY] = {
            name: p.grad.detach().cpu()
            for name, p in model.named_parameters()
            if p.grad is not None
        }
    checkpoint.update(extra)
    return checkpoint


def load_weights(
    model: nn.Module, weights: dict, *, strict: bool, source: str, logger: logging.Logger
) -> None:
    """Load the keys that fit; with ``strict``, refuse unless all do.

    A lazy parameter or buffer of ``model`` (``nn.LazyLinear``... before its first forward
    pass) has no shape to compare: it takes the checkpoint's, as torch's
    ``LazyModuleMixin`` does when a state dict is loaded into it. The parameter stays the
    same object, so an optimizer built on it before the load holds the loaded tensor.
    What the module infers from its input (``in_features``) is checked against that shape
    by its first forward pass.

    Raises:
        CheckpointMismatchError: ``strict`` and a key is missing, unexpected or mis-shaped,
            or torch refuses to load a value into the model.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    mismatched = [
        k
        for k in weights
        if k in own
        and isinstance(weights[k], torch.Tensor)
        and not is_lazy(own[k])
        and weights[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if mismatched:
        shapes = [f"{k}: {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched]
        problems.append(f"mis-shaped keys (checkpoint vs model) {shapes}")
    if problems and strict:
        raise CheckpointMismatchError(
            f"{source!r} does not fit the model: {'; '.join(problems)}. Pass strict=False "
            "to load the keys that match"
        )
    usable = {k: v for k, v in weights.items() if k in own and k not in mismatched}
    try:
        model.load_state_dict(usable, strict=False)
    except RuntimeError as err:  # a value torch cannot put in the model: so on every retry
        raise CheckpointMismatchError(f"{source!r} does not fit the model: {err}") from err
    if problems:
        logger.warning("loaded %s partially: %s", source, "; ".join(problems))


def restore_optimizer(wrapper, checkpoint: dict, source: str) -> None:
    """Load (and remove from ``checkpoint``) the optimizer section.

    Raises:
        CheckpointMismatchError: There is none, or it does not fit the optimizer.
    """
    if "optimizer" not in checkpoint:
        raise CheckpointMismatchError(
            f"{source!r} has no optimizer state; pass resume_optimizer=False to "
            "resume the weights with a fresh optimizer"
        )
    try:
        wrapper.load_state_dict(checkpoint.pop("optimizer"))
    except (ValueError, KeyError) as err:
        raise CheckpointMismatchError(
            f"the optimizer state in {source!r} does not fit this optimizer: {err}"
        ) from err


def restore_schedulers(schedulers: list, states, source: str) -> None:
    """Load the scheduler states, one per configured scheduler.

    Raises:
        CheckpointMismatchError: None saved, several optimizers' worth, or a count mismatch.
    """
    if states is None:
        raise CheckpointMismatchError(
            f"{source!r} has no scheduler state; pass resume_param_scheduler=False to "
            "keep the freshly built schedulers"
        )
    if isinstance(states, dict):
        raise CheckpointMismatchError(
            f"{source!r} holds schedulers of several optimizers ({sorted(states)}); "
            "this strategy has one optimizer"
        )
    if len(states) != len(schedulers):
        raise CheckpointMismatchError(
            f"{source!r} holds {len(states)} scheduler states but "
            f"{len(schedulers)} schedulers are configured"
        )
    for scheduler, state in zip(schedulers, states, strict=True):
        scheduler.load_state_dict(state)


def restore_gradients(model: nn.Module, checkpoint: dict) -> bool:
    """Put back the gradients of an accumulation window; True if there were any."""
    grads = checkpoint.pop(ACCUMULATED_GRADS_KEY, None)
    if not grads:
        return False
    params = dict(model.named_parameters())
    for name, grad in grads.items():
        if name in params:
            params[name].grad = grad.to(params[name].device)
    return True
