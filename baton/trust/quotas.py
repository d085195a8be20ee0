"""Operator quotas: how large a run may make a model, its horizon, its loaders and its
experiment folder.

A config that validates can still ask for a terabyte of parameters, a billion iterations
or a checkpoint every iteration kept forever. Quotas bound that, and like trust they come
only from the operator, never from a config, an override or a flow parameter:

* environment variables of the worker
  (``BATON_MAX_PARAMETERS``, ``BATON_MAX_EXPERIMENT_BYTES``, ``BATON_MAX_EXPERIMENT_FILES``,
  ``BATON_MIN_FREE_BYTES``, ``BATON_MAX_WORKERS``, ``BATON_MAX_ITERATIONS``), which win;
* a ``[tool.baton.quotas]`` table in the project's ``pyproject.toml`` (the same names in
  lower case, without ``BATON_``).

What is not set comes from :func:`machine_defaults`, derived from the machine the worker
runs on. Where each quota is enforced:

* at validation (:mod:`baton.config.checks`), with every other config problem: the
  model's parameters and buffers counted on the meta device, the horizon, the loader
  workers, and the checkpoint plan (files and bytes the run would keep at its peak);
* when a pipeline is built (:mod:`baton.run.pipeline`), what validation cannot know: the
  horizon and the plan with the real epoch length, and lazy parameters, materialized on a
  meta copy of the model by an input shaped like a training batch (a model that cannot
  run on meta tensors: right after its first real forward pass, before the first
  backward pass and optimizer step);
* before every checkpoint write (:mod:`baton.checkpoint.writer`): the experiment's
  committed files and bytes plus the new one, and the free space left after it.
"""

import copy
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter, is_lazy

from baton.errors import QuotaError, UntrustedInputError
from baton.randomness import cpu_rng_states, set_cpu_rng_states
from baton.trust import allowances
from baton.trust.allowances import OperatorSettings, Trust

logger = logging.getLogger(__name__)

# --- the defaults, all in one place ---------------------------------------------------

# Bytes one trained fp32 parameter takes: the weight, its gradient, two optimizer moments.
BYTES_PER_PARAMETER = 16
# Physical memory assumed where the platform cannot say (no sysconf).
FALLBACK_MEMORY_BYTES = 16 << 30
# One experiment may fill this share of the filesystem its folder is on.
EXPERIMENT_DISK_SHARE = 0.5
# Checkpoint files one experiment may hold, all lineages together.
DEFAULT_MAX_EXPERIMENT_FILES = 10_000
# A save must leave this share of its filesystem free, at most MIN_FREE_CAP bytes.
MIN_FREE_SHARE = 0.01
MIN_FREE_CAP = 1 << 30
# Iterations of one run's horizon: ten million, about a day at a hundred iterations a
# second (the schema alone allows 1e9).
DEFAULT_MAX_ITERATIONS = 10_000_000
# Loader workers per split: the cores this process may use, but never fewer than this,
# so that the shipped configs (two workers) run on a one-core machine too.
MIN_DEFAULT_WORKERS = 2

# The checkpoint size a plan assumes: the model's parameter and buffer bytes times this
# factor (the weights plus up to two optimizer moments, as Adam keeps) when the optimizer
# is saved, the bytes alone when it is not, plus SAVE_OVERHEAD for meta and pickling.
CHECKPOINT_STATE_FACTOR = 3
SAVE_OVERHEAD = 64 << 10

# quota -> (environment variable, what the operator does to allow more)
QUOTAS = {
    "max_parameters": ("BATON_MAX_PARAMETERS", "raises"),
    "max_experiment_bytes": ("BATON_MAX_EXPERIMENT_BYTES", "raises"),
    "max_experiment_files": ("BATON_MAX_EXPERIMENT_FILES", "raises"),
    "min_free_bytes": ("BATON_MIN_FREE_BYTES", "lowers"),
    "max_workers": ("BATON_MAX_WORKERS", "raises"),
    "max_iterations": ("BATON_MAX_ITERATIONS", "raises"),
    "max_processes": ("BATON_MAX_PROCESSES", "raises"),
}


def machine_defaults(folder: Path) -> dict[str, int]:
    """Each quota when the operator sets none, from this machine and the filesystem that
    holds ``folder`` (the experiments' folder; it need not exist yet)."""
    disk = os.statvfs(existing_ancestor(folder))
    disk_size = disk.f_blocks * disk.f_frsize
    return {
        "max_parameters": physical_memory() // BYTES_PER_PARAMETER,
        "max_experiment_bytes": int(disk_size * EXPERIMENT_DISK_SHARE),
        "max_experiment_files": DEFAULT_MAX_EXPERIMENT_FILES,
        "min_free_bytes": min(int(disk_size * MIN_FREE_SHARE), MIN_FREE_CAP),
        "max_workers": max(usable_cores(), MIN_DEFAULT_WORKERS),
        "max_iterations": DEFAULT_MAX_ITERATIONS,
        "max_processes": default_processes(),
    }


def default_processes() -> int:
    """Training processes a run may start when the operator sets no quota: one per GPU,
    or one per usable core on a machine without one."""
    return torch.cuda.device_count() or usable_cores()


def physical_memory() -> int:
    """Bytes of physical memory of this machine."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return FALLBACK_MEMORY_BYTES


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest parent that exists (a folder not created yet is on the
    filesystem of the folder that will hold it)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def where_to_change(quota: str) -> str:
    """The end of a refusal: where an operator changes ``quota``."""
    env, verb = QUOTAS[quota]
    return (
        f"an operator {verb} it with {env} in the worker's environment or {quota} under "
        "[tool.baton.quotas] in pyproject.toml"
    )


@dataclass(frozen=True)
class Quotas:
    """The operator's quotas (see the module docstring); build it with
    :meth:`from_environment`.

    Attributes:
        max_parameters: Parameters and buffers of the model.
        max_experiment_bytes: Bytes of an experiment's committed checkpoints.
        max_experiment_files: Committed checkpoint files of an experiment.
        min_free_bytes: Bytes a checkpoint write must leave free on its filesystem.
        max_workers: ``num_workers`` of each data split.
        max_iterations: Iterations of a run's horizon.
        max_processes: Training processes of a run (``launcher.nproc``).
    """

    max_parameters: int
    max_experiment_bytes: int
    max_experiment_files: int
    min_free_bytes: int
    max_workers: int
    max_iterations: int
    max_processes: int

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] | None = None, *, folder: str | Path | None = None
    ) -> "Quotas":
        """The quotas in effect for this process: the environment, then
        ``[tool.baton.quotas]``, then :func:`machine_defaults` for ``folder`` (where the
        experiments are written; default: the project). Inside a run that holds its trust
        (:func:`~baton.trust.allowances.held_trust`), those read with the run's trust.

        Raises:
            UntrustedInputError: A value that is not a positive integer, or an unknown key
                in ``[tool.baton.quotas]``: the operator's settings are wrong.
        """
        if environ is None and allowances.holds_trust():
            return cls.of(Trust.from_environment(), folder=folder)
        return cls._of_settings(OperatorSettings.read(environ), folder)

    @classmethod
    def of(cls, trust: Trust, *, folder: str | Path | None = None) -> "Quotas":
        """The quotas set where ``trust`` was read from (one reading of the operator's
        settings: nothing is read again), the rest from :func:`machine_defaults` for
        ``folder``; for a trust made by hand, :meth:`from_environment`.

        Raises:
            UntrustedInputError: As :meth:`from_environment`.
        """
        if trust.settings is None:
            return cls.from_environment(folder=folder)
        return cls._of_settings(trust.settings, folder)

    @classmethod
    def _of_settings(cls, settings: OperatorSettings, folder: str | Path | None) -> "Quotas":
        project, environ = settings.project, settings.environ
        table = settings.subtable("quotas")
        unknown = sorted(set(table) - set(QUOTAS))
        if unknown:
            raise UntrustedInputError(
                f"[tool.baton.quotas] in {project / 'pyproject.toml'} has unknown key(s) "
                f"{unknown}; known: {', '.join(QUOTAS)}"
            )
        values = machine_defaults(Path(folder) if folder is not None else project)
        for quota, (env, _) in QUOTAS.items():
            if quota in table:
                values[quota] = _positive(table[quota], f"[tool.baton.quotas] {quota}")
            if environ.get(env, "").strip():
                values[quota] = _positive(environ[env].strip(), f"{env} in the environment")
        return cls(**values)

    def refusal(self, what: str, quota: str, fix: str) -> str:
        """A refusal naming the quota, its value and where an operator changes it:
        ``"<what>, more than the quota of N (quota); <fix>, or an operator ..."``."""
        limit = getattr(self, quota)
        relation = "less than the floor" if QUOTAS[quota][1] == "lowers" else "more than the quota"
        return f"{what}, {relation} of {limit:,} ({quota}); {fix}, or {where_to_change(quota)}"

    # checks -----------------------------------------------------------------------------

    def model_problem(self, model: nn.Module, what: str = "model") -> str | None:
        """The refusal for a model (or the loss, ``what``) over ``max_parameters``
        (parameters and buffers that are not lazy), else ``None``."""
        count = count_parameters(model)
        if count <= self.max_parameters:
            return None
        return self.refusal(
            f"{what} has {count:,} parameters", "max_parameters", f"use a smaller {what}"
        )

    def check_model(self, model: nn.Module, *, example_input: Any = None) -> nn.Module:
        """Refuse a built model over ``max_parameters``, lazy parameters included, before
        it sees any input.

        Lazy parameters (``nn.LazyLinear``...) get their shapes from the first forward
        pass, which also allocates them: they are counted on a copy of the model on the
        meta device, materialized by a forward pass of ``example_input`` (meta tensors,
        see :meth:`ResumableLoader.meta_batch <baton.data.ResumableLoader.meta_batch>`),
        so a model too large to allocate is refused without allocating it. Where that
        dry run cannot be made (no ``example_input``, or a model that fails on meta
        tensors), they are counted right after the real forward pass that materializes
        them, before any backward pass or optimizer step. The dry run leaves ``model``
        and every RNG state as they were: the real model is materialized, with the same
        random draws, by its first real input.

        Returns:
            The model as counted: the meta copy when the dry run materialized it (its
            sizes are those the real model will have), else ``model``.

        Raises:
            QuotaError: The model is over the quota.
        """
        if not has_lazy_parameters(model):
            self._refuse_model(model)
            return model
        materialized = materialized_on_meta(model, example_input)
        if materialized is not None:
            self._refuse_model(
                materialized,
                " (its lazy parameters counted on the meta device, for an input shaped like "
                "a training batch)",
            )
            return materialized
        # No dry run: count what is known now, and the rest once the first real forward
        # pass has set it (it has then allocated it, but no backward pass nor optimizer
        # step has run yet).
        self._refuse_model(model)

        def after_forward(module: nn.Module, args: Any, output: Any) -> None:
            if has_lazy_parameters(module):
                return
            handle.remove()
            self._refuse_model(module, " (counted once its lazy parameters were set)")

        handle = model.register_forward_hook(after_forward)
        return model

    def _refuse_model(self, model: nn.Module, how: str = "") -> None:
        problem = self.model_problem(model)
        if problem:
            raise QuotaError(problem + how)

    def check_save(
        self, *, name: str, estimate: int, committed_files: int, committed_bytes: int
    ) -> None:
        """Refuse a checkpoint of about ``estimate`` bytes that would take an experiment
        holding ``committed_files`` and ``committed_bytes`` over its quotas.

        Raises:
            QuotaError: Naming the quota; nothing has been written.
        """
        untouched = "; nothing was written, the earlier checkpoints and the manifest are untouched"
        if committed_files + 1 > self.max_experiment_files:
            raise QuotaError(
                self.refusal(
                    f"saving {name} would make {committed_files + 1:,} checkpoint files in "
                    "the experiment",
                    "max_experiment_files",
                    "set checkpoint.keep_last or delete old lineages (baton ckpt)",
                )
                + untouched
            )
        if committed_bytes + estimate > self.max_experiment_bytes:
            raise QuotaError(
                self.refusal(
                    f"saving {name} (about {estimate:,} bytes) would make the experiment's "
                    f"checkpoints {committed_bytes + estimate:,} bytes",
                    "max_experiment_bytes",
                    "set a smaller checkpoint.keep_last or delete old lineages",
                )
                + untouched
            )

    def check_free_space(self, folder: Path, *, name: str, estimate: int) -> None:
        """Refuse a write of about ``estimate`` bytes into ``folder`` that would leave
        less than ``min_free_bytes`` free on its filesystem.

        Raises:
            QuotaError: Naming the free space and the floor; nothing has been written.
        """
        disk = os.statvfs(existing_ancestor(folder))
        free = disk.f_bavail * disk.f_frsize
        if free - estimate >= self.min_free_bytes:
            return
        raise QuotaError(
            self.refusal(
                f"saving {name} (about {estimate:,} bytes) would leave "
                f"{max(free - estimate, 0):,} bytes free on the filesystem of {folder}",
                "min_free_bytes",
                "free space on that disk",
            )
            + "; nothing was written, the earlier checkpoints and the manifest are untouched"
        )


def _positive(value: Any, where: str) -> int:
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            value = None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UntrustedInputError(
            f"{where} must be a positive integer (an operator's quota), got {value!r}"
        )
    return value


# --- counting ------------------------------------------------------------------------


def has_lazy_parameters(model: nn.Module) -> bool:
    """True while some parameter or buffer of ``model`` has no shape yet."""
    return any(is_lazy(t) for t in (*model.parameters(), *model.buffers()))


def materialized_on_meta(model: nn.Module, example_input: Any) -> nn.Module | None:
    """A copy of ``model`` on the meta device whose lazy parameters a training-mode
    forward pass of ``example_input`` (meta tensors) has materialized; nothing is
    allocated, and ``model`` and the RNG states are left as they were.

    Returns:
        The copy; ``None`` when there is no ``example_input``, when the model fails on
        meta tensors (a forward pass whose control flow reads the data, an operator with
        no meta kernel) or leaves lazy parameters unset.
    """
    if example_input is None:
        return None
    # Meta kernels draw no random numbers, but a forward pass may draw from python's or
    # numpy's generators itself (stochastic depth, say): the run's states are put back.
    states = cpu_rng_states()
    try:
        replica = _meta_copy(model)
        replica.train()  # the mode of the first real forward pass (the training loop's)
        with torch.no_grad():
            replica(example_input)
    except Exception as err:  # whatever the model raises on meta tensors: fall back
        logger.warning(
            "%s could not run on meta tensors (%s: %s); its lazy parameters are counted "
            "after its first forward pass",
            type(model).__name__,
            type(err).__name__,
            err,
        )
        return None
    finally:
        set_cpu_rng_states(states)
    return None if has_lazy_parameters(replica) else replica


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are meta tensors of the same
    shapes and dtypes (lazy ones stay lazy, on the meta device): the real ones are never
    copied."""
    memo: dict[int, Any] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        memo[id(tensor)] = _on_meta(tensor)
    return copy.deepcopy(model, memo)


def _on_meta(tensor: torch.Tensor) -> torch.Tensor:
    if isinstance(tensor, UninitializedParameter):
        return UninitializedParameter(tensor.requires_grad, device="meta", dtype=tensor.dtype)
    if isinstance(tensor, UninitializedBuffer):
        return UninitializedBuffer(tensor.requires_grad, device="meta", dtype=tensor.dtype)
    empty = torch.empty_like(tensor, device="meta")
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(empty, requires_grad=tensor.requires_grad)
    return empty


def count_parameters(model: nn.Module) -> int:
    """Elements of ``model``'s parameters and buffers (shared ones once; lazy ones, which
    have no shape yet, not at all). Works on the meta device: nothing is allocated."""
    return sum(t.numel() for t in _tensors(model))


def state_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers (as :func:`count_parameters` counts)."""
    return sum(t.numel() * t.element_size() for t in _tensors(model))


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    seen, out = set(), []
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) not in seen and not is_lazy(tensor):
            seen.add(id(tensor))
            out.append(tensor)
    return out


def checkpoint_estimate(model_bytes: int, *, save_optimizer: bool) -> int:
    """The size a plan assumes for a checkpoint of a model of ``model_bytes``."""
    factor = CHECKPOINT_STATE_FACTOR if save_optimizer else 1
    return model_bytes * factor + SAVE_OVERHEAD


def estimate_bytes(obj: Any) -> int:
    """The bytes ``torch.save`` writes for ``obj``, about: every tensor storage once (a
    view saves its whole storage), plus :data:`SAVE_OVERHEAD`."""
    storages: dict[tuple, int] = {}

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            try:
                storage = value.untyped_storage()
            except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
                storages[(id(value),)] = value.numel() * value.element_size()
                return
            key = (value.device, storage.data_ptr()) if storage.data_ptr() else (id(value),)
            storages[key] = storage.nbytes()
        elif isinstance(value, Mapping):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        elif hasattr(value, "__array_interface__"):  # a numpy array, pickled whole
            storages[(id(value),)] = int(getattr(value, "nbytes", 0))

    walk(obj)
    return sum(storages.values()) + SAVE_OVERHEAD
