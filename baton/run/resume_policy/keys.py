"""The resume policy's table: the class of every config key, and the comparison of a
checkpoint's config with the current one (:mod:`baton.run.resume_policy` explains the classes).

The table gives each key's class when nothing that trains reads it; a few keys steer
training only in some configs (validation, when a scheduler follows validation metrics:
:func:`steering_keys`), and :func:`compare` classifies them by the configs it compares.

Two rules sit on top of the table: a fork that changes the data or the seed starts at an
epoch's end (:func:`needs_epoch_boundary`), and a moved horizon with gradient accumulation
may not continue exactly (:func:`horizon_problem`).
"""

import enum
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ValidationError

from baton import build
from baton.config.schema import PipelineConfig
from baton.errors import ConfigError


class KeyClass(enum.Enum):
    """What a change of a config key does to a resumed run."""

    FREE = "free to change"
    RUN = "changes the run"
    START = "fixed at the start"


FREE, RUN, START = KeyClass.FREE, KeyClass.RUN, KeyClass.START

KEY_CLASSES: dict[str, KeyClass] = {
    # Where the experiment lives and which checkpoint this run starts from: a moved
    # experiment, or another experiment's checkpoint named on purpose, trains the same.
    "experiment_name": FREE,
    "work_dir": FREE,
    "resume": FREE,
    "fork": FREE,
    # The seed orders the data of every later epoch; determinism changes GPU numerics.
    "randomness.seed": RUN,
    "randomness.deterministic": RUN,
    "randomness.diff_rank_seed": RUN,
    # The checkpoint's weights fit only the model they were trained with.
    "model": START,
    "loss": RUN,
    # What is trained on and how it is batched.
    "train_data.dataset": RUN,
    "train_data.batch_size": RUN,
    "train_data.shuffle": RUN,
    "train_data.drop_last": RUN,
    # How the loader reads: the randomness a sample sees is a function of (seed, epoch,
    # index), not of the worker that reads it (baton/data.py), so these train the same.
    "train_data.num_workers": FREE,
    # The number of processes: a resume keeps the checkpoint's global batch, split across
    # however many processes this run has (resume_policy/world_size.py).
    "launcher.nproc": FREE,
    "launcher.backend": FREE,
    "train_data.pin_memory": FREE,
    "train_data.persistent_workers": FREE,
    "train_data.prefetch_factor": FREE,
    # Validation measures the model; it draws no random numbers and changes no weight.
    # Unless a scheduler follows its metrics: then VALIDATION_KEYS change the run.
    "val_data.dataset": FREE,
    "val_data.batch_size": FREE,
    "val_data.shuffle": FREE,
    "val_data.num_workers": FREE,
    "val_data.drop_last": FREE,
    "val_data.pin_memory": FREE,
    "val_data.persistent_workers": FREE,
    "val_data.prefetch_factor": FREE,
    "optim_wrapper.type": RUN,
    "optim_wrapper.optimizer": RUN,
    "optim_wrapper.accumulative_counts": RUN,
    "optim_wrapper.clip_grad.type": RUN,
    "optim_wrapper.clip_grad.max_norm": RUN,
    "optim_wrapper.clip_grad.norm_type": RUN,
    "optim_wrapper.clip_grad.clip_value": RUN,
    "optim_wrapper.clip_grad.error_if_nonfinite": RUN,
    "param_scheduler": RUN,
    # The horizon may move (a finished run is extended by raising it; see
    # horizon_problem for the one case where that cannot be exact).
    "train.max_epochs": FREE,
    "train.max_iters": FREE,
    "train.val_interval": FREE,
    "train.log_interval": FREE,
    "checkpoint.interval": FREE,
    "checkpoint.interval_iters": FREE,
    "checkpoint.keep_last": FREE,
    "checkpoint.keep_best": FREE,
    "checkpoint.best_metric": FREE,
    "checkpoint.best_mode": FREE,
    "checkpoint.save_optimizer": FREE,
    "checkpoint.async_save": FREE,
    # Weights to start from apply only to a fresh start, never to a resume.
    "load_from.uri": START,
    "load_from.revise_keys": START,
    "load_from.strict": START,
    "compile": RUN,
    "auto_scale_lr.enable": RUN,
    "auto_scale_lr.base_batch_size": RUN,
    "amp": RUN,
}

# What validation measures and when: free keys, except where a scheduler reads validation
# metrics (ReduceOnPlateau, any scheduler with ``need_val_args``): another dataset, batch
# size (the mean loss is summed in another order), order, dropped tail or interval gives it
# other metrics, so it changes the learning rate. How the loader reads (workers, pinning,
# prefetching) gives the same batches in the same order: free in every config.
VALIDATION_KEYS = (
    "val_data.dataset",
    "val_data.batch_size",
    "val_data.shuffle",
    "val_data.drop_last",
    "train.val_interval",
)

_ORDER = {FREE: 0, RUN: 1, START: 2}
_UNSET = "(unset)"


def schema_keys(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> Iterator[str]:
    """Every leaf key of a config schema (sections are walked, components are leaves)."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        section = _section_model(field.annotation)
        if section is None:
            yield key
        else:
            yield from schema_keys(section, f"{key}.")


def _section_model(annotation: Any) -> type[BaseModel] | None:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _section_model(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _section_model(options[0]) if len(options) == 1 else None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def reads_validation(config: Mapping) -> bool:
    """True when a scheduler of ``config`` (a resolved config, as a dict) follows
    validation metrics (``need_val_args``, as mmengine marks ReduceOnPlateau). A scheduler
    type that cannot be resolved here is taken to read them: the safe answer."""
    schedulers = config.get("param_scheduler") or []
    if isinstance(schedulers, Mapping):
        schedulers = [schedulers]
    for scheduler in schedulers:
        try:
            cls = build.resolve(scheduler.get("type"), "scheduler")
        except (ConfigError, AttributeError):
            return True
        if getattr(cls, "need_val_args", False):
            return True
    return False


def steering_keys(*configs: Mapping) -> frozenset[str]:
    """The keys the table calls free that steer training in any of ``configs``: the
    validation keys (:data:`VALIDATION_KEYS`) when a scheduler reads validation metrics."""
    if any(reads_validation(c) for c in configs):
        return frozenset(VALIDATION_KEYS)
    return frozenset()


def classify(key: str, *, steering: frozenset[str] = frozenset()) -> KeyClass:
    """The class of a leaf key: that of the nearest table key above it (or itself).

    A key naming a whole section (``val_data`` switched on or off) takes the strictest
    class of the keys in it. A key the table does not know changes the run: that is
    the safe answer for a key added to the schema and forgotten here.

    Args:
        steering: Free keys that steer training in the configs compared
            (:func:`steering_keys`): they, and the leaves under them, change the run.
    """
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        found = KEY_CLASSES.get(prefix)
        if found is not None:
            return RUN if found is FREE and prefix in steering else found
    inside = [classify(k, steering=steering) for k in KEY_CLASSES if k.startswith(key + ".")]
    return max(inside, key=_ORDER.__getitem__) if inside else RUN


@dataclass(frozen=True)
class ConfigChange:
    """One leaf key whose value differs between a checkpoint's config and this one."""

    key: str
    old: Any
    new: Any
    kind: KeyClass

    def __str__(self) -> str:
        return f"{self.key}: {_show(self.old)} -> {_show(self.new)}"

    def as_record(self) -> dict:
        """A JSON-able record for a checkpoint's ``meta`` (a side that was unset is left out)."""
        record = {"key": self.key, "old": self.old, "new": self.new, "class": self.kind.name}
        return {k: v for k, v in record.items() if v is not _Absent}


def _show(value: Any) -> str:
    text = _UNSET if value is _Absent else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _AbsentType:
    def __repr__(self) -> str:
        return _UNSET


_Absent = _AbsentType()


def _diff(old: Any, new: Any, key: str, out: list[tuple[str, Any, Any]]) -> None:
    """Leaf by leaf differences; a component whose ``type`` changed is one difference."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        if "type" in old and "type" in new and old["type"] != new["type"]:
            out.append((key, dict(old), dict(new)))
            return
        for name in sorted(old.keys() | new.keys(), key=str):
            child = f"{key}.{name}" if key else str(name)
            _diff(old.get(name, _Absent), new.get(name, _Absent), child, out)
    elif _is_components(old) and _is_components(new) and len(old) == len(new):
        for index, (a, b) in enumerate(zip(old, new, strict=True)):
            _diff(a, b, f"{key}.{index}", out)
    elif old != new:
        out.append((key, old, new))


def _is_components(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, Mapping) for v in value)


def _resolved(saved: Mapping) -> dict:
    """A checkpoint's config with this version's defaults filled in, so that a key added
    to the schema since then compares as its default. Keys this version no longer has
    are dropped. A config the schema cannot read is compared as it is."""
    known = {k: v for k, v in saved.items() if k in PipelineConfig.model_fields}
    try:
        return PipelineConfig.model_validate(known).model_dump(mode="json")
    except ValidationError:
        return dict(known)


def compare(saved: Mapping, current: Mapping) -> list[ConfigChange]:
    """Every leaf that differs between a checkpoint's config and the current one, each
    classified by the table and by what the two configs' schedulers read
    (:func:`steering_keys`).

    Args:
        saved: The checkpoint's ``meta['config']``.
        current: The resolved config of this run (``model_dump(mode='json')``).
    """
    found: list[tuple[str, Any, Any]] = []
    saved = _resolved(saved)
    _diff(saved, dict(current), "", found)
    steering = steering_keys(saved, current)
    changes = []
    for key, before, after in found:
        if key == "randomness.seed" and after is None:
            continue  # no seed configured: the run goes on with the one it drew
        changes.append(ConfigChange(key, before, after, classify(key, steering=steering)))
    return changes


# Keys that decide the order of the current epoch's batches: a fork that changes one
# must start at an epoch's end, or the epoch would be half one order and half another.
_EPOCH_ORDER_KEYS = ("train_data", "randomness.seed")


def needs_epoch_boundary(key: str) -> bool:
    """True when a fork that changes ``key`` can only start at the end of an epoch."""
    return any(key == k or key.startswith(k + ".") for k in _EPOCH_ORDER_KEYS)


def horizon_problem(*, counts: int, at_iter: int, old_max: int, new_max: int) -> str | None:
    """Why moving the horizon with gradient accumulation cannot continue exactly, or None.

    With ``accumulative_counts > 1`` the last window of a run is cut short by its
    horizon: its gradients are scaled by the shorter window and the optimizer steps at
    the horizon. A run resumed at ``at_iter`` equals a run trained to ``new_max`` from
    the start only if every iteration so far fell in a full window under both horizons.
    """
    if counts <= 1 or old_max == new_max or at_iter >= new_max:
        return None
    old_full, new_full = old_max - old_max % counts, new_max - new_max % counts
    if at_iter <= min(old_full, new_full):
        return None
    return (
        f"moving the horizon from {old_max} to {new_max} iterations cannot continue exactly "
        f"from iteration {at_iter}: with accumulative_counts {counts}, the iterations after "
        f"{min(old_full, new_full)} fell in an accumulation window that one of the horizons "
        f"cuts short (its gradients scaled for the shorter window, the optimizer stepping at "
        f"the horizon), so they differ from a run trained to {new_max} from the start. "
        f"Keep the horizon at {old_max}, or continue anyway on purpose with a fork; choose "
        f"horizons that are multiples of {counts} to extend runs exactly"
    )
