"""Seeding, and capture and restore of every RNG state a training step can touch.

States are stored as plain Python values and tensors only, so that a checkpoint holding
them loads with ``torch.load(weights_only=True)`` (ours and mmengine's loaders alike).
"""

import os
import random
import sys

import numpy as np
import torch

# Seeds drawn when none is configured stay below 2**31, which every RNG accepts.
_MAX_SEED = 2**31 - 1


def draw_seed() -> int:
    """A fresh random seed from the OS's entropy source."""
    return random.SystemRandom().randint(0, _MAX_SEED)


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices); optionally make torch deterministic.

    ``deterministic=True`` turns on ``torch.use_deterministic_algorithms``, disables the
    cuDNN autotuner and sets ``CUBLAS_WORKSPACE_CONFIG`` when it is not set already.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        set_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def set_deterministic_algorithms(mode: bool) -> None:
    """``torch.use_deterministic_algorithms(mode)`` without importing the compiler stack.

    The public call also sets ``torch._inductor.config.deterministic``, and importing
    that module takes 1.5 s in every new process. When inductor is not loaded yet, only
    the eager flag is set here; :func:`sync_inductor_determinism` passes it on before a
    model is compiled.
    """
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if "torch._inductor.config" in sys.modules or setter is None:
        torch.use_deterministic_algorithms(mode)
    else:
        setter(mode, warn_only=False)


def sync_inductor_determinism() -> None:
    """Give the compiler the eager deterministic flag (call before ``torch.compile``)."""
    torch.use_deterministic_algorithms(
        torch.are_deterministic_algorithms_enabled(),
        warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
    )


def capture_rng_state() -> dict:
    """Every RNG state as a checkpoint-safe dict (python, numpy, torch, cuda)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": _to_lists(random.getstate()),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Restore states captured by :func:`capture_rng_state`.

    A CUDA state is restored only when CUDA is available; its absence on a CPU machine
    is not an error (the file may come from a GPU run).
    """
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available():
        count = min(len(cuda_states), torch.cuda.device_count())
        for index in range(count):
            torch.cuda.set_rng_state(cuda_states[index].cpu(), device=index)


def _to_lists(value):
    if isinstance(value, tuple):
        return [_to_lists(v) for v in value]
    return value
