"""The checkpoint dict: mmengine's top-level layout plus baton's ``meta`` fields.

::

    {
      "meta": {"epoch", "iter", "step_in_epoch", "seed", "rng", "time", "baton",
               "config_hash", "accumulation", "environment", ...caller's extra meta},
      "state_dict": {...model weights, on CPU...},
      "optimizer": {...optimizer state, on CPU...},        # unless save_optimizer=False
      "param_schedulers": [{...}, ...],                    # unless save_param_scheduler=False
      ...caller's extra keys...
    }

Everything in it is a dict, list, tuple, number, string or tensor, so that it loads with
``torch.load(weights_only=True)`` here and in mmengine.
"""

import time
from collections.abc import Mapping
from typing import Any

import torch

from baton._version import __version__
from baton.errors import CheckpointError

# The layout version this baton writes and the newest it reads.
FORMAT_VERSION = 1


def to_cpu(value: Any) -> Any:
    """A copy of a (nested) state with every tensor on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, Mapping):
        return type(value)((k, to_cpu(v)) for k, v in value.items())
    if isinstance(value, list):
        return [to_cpu(v) for v in value]
    if isinstance(value, tuple):
        return tuple(to_cpu(v) for v in value)
    return value


def make_meta(
    *,
    epoch: int,
    iter: int,
    step_in_epoch: int,
    seed: int,
    rng: dict,
    config_hash: str | None,
    accumulation: dict | None,
    extra_meta: Mapping | None,
    environment: dict | None = None,
) -> dict:
    """The ``meta`` section: position and provenance, then the caller's extras, then the
    keys the strategy owns (seed, RNG states, time, version, the environment's
    fingerprint when given)."""
    meta: dict = {
        "epoch": epoch,
        "iter": iter,
        "step_in_epoch": step_in_epoch,
        "config_hash": config_hash,
    }
    if accumulation is not None:
        meta["accumulation"] = accumulation
    meta.update(extra_meta or {})
    meta.update(
        seed=seed,
        rng=rng,
        time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        baton=__version__,
        format=FORMAT_VERSION,
    )
    if environment is not None:
        meta["environment"] = environment
    return meta


def split_weights(checkpoint: Any, source: str) -> tuple[dict, dict]:
    """Separate the model weights from the rest of a loaded checkpoint.

    Accepts ``{'state_dict': ...}`` (mmengine, baton), ``{'model': ...}`` (many training
    scripts) and bare state dicts (``torch.save(model.state_dict())``).

    Returns:
        ``(weights, rest)``: ``rest`` is the checkpoint without its weights.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(
            f"{source!r} holds a {type(checkpoint).__name__}, not a checkpoint dict"
        )
    meta = checkpoint.get("meta")
    version = meta.get("format", FORMAT_VERSION) if isinstance(meta, Mapping) else FORMAT_VERSION
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{source!r} was written by baton {meta.get('baton', '?')} in checkpoint format "
            f"{version!r}; this baton ({__version__}) reads format {FORMAT_VERSION} and older. "
            "Upgrade baton to load it"
        )
    rest = dict(checkpoint)
    for key in ("state_dict", "model"):
        if key in rest and isinstance(rest[key], Mapping):
            return dict(rest.pop(key)), rest
    if rest and all(isinstance(v, torch.Tensor) for v in rest.values()):
        return rest, {}
    raise CheckpointError(
        f"{source!r} has no model weights: expected a 'state_dict' or 'model' entry or a bare "
        f"state dict, found keys {sorted(map(str, rest))[:10]}"
    )
