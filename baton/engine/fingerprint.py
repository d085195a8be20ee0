"""The environment a checkpoint was trained in, and which of its differences break exactness.

Every checkpoint a strategy writes carries ``meta['environment']``
(:func:`environment_fingerprint`): torch's version and build (CPU, CUDA or ROCm), cuDNN,
the device, the CPU kernels torch dispatches to and its thread count, the determinism
flags, Python, numpy, baton, the config hash and the world size. A resume or a
verification compares the checkpoint's with the live one (:func:`fingerprint_changes`):
a change in a field of :data:`BREAKS_BITWISE` means a continued run cannot be bitwise
equal to an uninterrupted one, and the caller says so, naming the field.
``docs/resume.md`` says why each field matters or not.

Old checkpoints (and mmengine's) have no fingerprint: nothing is compared, and nothing is
refused for it.
"""

import functools
import platform
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from baton._version import __version__

# ``meta`` key of the fingerprint.
ENVIRONMENT_KEY = "environment"

# Fields whose change makes other kernels (or another order of floating-point
# operations, or another data split) run, so a continued run is not bitwise equal to an
# uninterrupted one. The others are recorded for the reader (provenance).
BREAKS_BITWISE: dict[str, str] = {
    "torch": "another torch release may change kernels and their summation order",
    "build": "another CUDA/ROCm build links other kernel libraries (cuBLAS, MIOpen)",
    "cudnn": "another cuDNN picks other convolution algorithms",
    "device": "another GPU model runs other kernels (tile sizes, TF32, atomics)",
    "cpu_capability": "torch's CPU kernels are vectorised per instruction set (AVX2, "
    "AVX512...), which changes the order of floating-point sums",
    "cpu_threads": "on the CPU, torch splits its sums (a matrix product's) across its "
    "threads: another thread count (torch.set_num_threads, OMP_NUM_THREADS) adds in "
    "another order; compared only when both trained on the CPU",
    "deterministic": "non-deterministic algorithms (or cuDNN's autotuner, or TF32) differ "
    "from run to run",
    "world_size": "another number of processes splits the data and sums gradients differently",
    "python": "random's methods other than random() (gauss, randint...) may change between "
    "Python versions (compared to the minor version); its documentation promises only "
    "seeding and random()",
}
# Recorded, and shown by ``baton ckpt inspect``; a change does not break exactness.
INFORMATIVE: dict[str, str] = {
    "numpy": "the legacy numpy.random generator's stream is frozen across versions",
    "baton": "the checkpoint format is versioned (meta.format); training changes are in "
    "CHANGELOG.md",
    "config_hash": "the resume policy compares the configs key by key (free keys may change)",
}


@dataclass(frozen=True)
class FingerprintChange:
    """One field that differs between two fingerprints."""

    field: str
    before: Any
    after: Any

    @property
    def breaks_bitwise(self) -> bool:
        """Whether the change makes a bitwise-equal continuation impossible."""
        return self.field in BREAKS_BITWISE

    def __str__(self) -> str:
        return f"{self.field}: {_shown(self.before)} -> {_shown(self.after)}"


def _shown(value: Any) -> str:
    """A recorded value as a message shows it, cut short (a file's fingerprint may hold
    anything)."""
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def current_world_size(world_size: int | None = None) -> int:
    """``world_size`` when the caller knows it (a distributed strategy), else the
    initialised process group's size, else 1 (one process)."""
    if world_size is not None:
        return int(world_size)
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        return distributed.get_world_size()
    return 1


@functools.cache
def _build() -> str:
    if torch.version.hip:
        return f"rocm {torch.version.hip}"
    if torch.version.cuda:
        return f"cuda {torch.version.cuda}"
    return "cpu"


@functools.cache
def _cpu_capability() -> str | None:
    get = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    return get() if get is not None else None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def _cudnn() -> int | None:
    return torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None


def _deterministic() -> dict[str, bool]:
    return {
        "algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "matmul_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_tf32": bool(torch.backends.cudnn.allow_tf32),
    }


def environment_fingerprint(
    device: torch.device, *, config_hash: str | None, world_size: int | None = None
) -> dict:
    """The environment a checkpoint is written in, as plain values (JSON-able).

    Args:
        device: The training device.
        config_hash: The resolved config's hash (``None`` for a strategy used without one).
        world_size: The number of training processes; ``None`` takes the initialised
            process group's size, or 1.
    """
    return {
        "torch": str(torch.__version__),  # a TorchVersion, which safe loading refuses
        "build": _build(),
        "cudnn": _cudnn(),
        "device": _device_name(device),
        "cpu_capability": _cpu_capability(),
        "cpu_threads": torch.get_num_threads(),
        "deterministic": _deterministic(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "baton": __version__,
        "config_hash": config_hash,
        "world_size": current_world_size(world_size),
    }


def fingerprint_changes(saved: Any, current: dict) -> list[FingerprintChange] | None:
    """What differs from ``saved`` (a checkpoint's ``meta['environment']``) to ``current``;
    ``None`` when ``saved`` is no fingerprint (a checkpoint written before baton recorded
    one, or by mmengine). Fields missing on one side are not compared."""
    if not isinstance(saved, dict):
        return None
    on_cpu = saved.get("device") == current.get("device") == "cpu"
    return [
        FingerprintChange(field, saved[field], current[field])
        for field in current
        if field in saved and _differs(field, saved[field], current[field], on_cpu=on_cpu)
    ]


def _differs(field: str, before: Any, after: Any, *, on_cpu: bool) -> bool:
    if field == "cpu_threads" and not on_cpu:
        return False  # the model's arithmetic runs on the accelerator
    if field == "deterministic" and on_cpu and isinstance(before, dict) and isinstance(after, dict):
        # cuDNN and TF32 switches change nothing on the CPU.
        return before.get("algorithms") != after.get("algorithms")
    if field == "python" and isinstance(before, str) and isinstance(after, str):
        # random's methods change with a minor version (3.11 -> 3.12), not with a patch.
        return before.split(".")[:2] != after.split(".")[:2]
    return before != after


def breaking(changes: list[FingerprintChange] | None) -> list[FingerprintChange]:
    """The changes that make a bitwise-equal continuation impossible."""
    return [c for c in changes or [] if c.breaks_bitwise]


def describe(changes: list[FingerprintChange]) -> str:
    """One line naming each change and why it matters."""
    return "; ".join(
        f"{change} ({BREAKS_BITWISE.get(change.field) or INFORMATIVE.get(change.field, '')})"
        for change in changes
    )
