"""What may change between a checkpoint's config and the config that resumes it.

A resumed run continues the run that wrote the checkpoint, so its config must describe
the same run. Every key of :class:`~baton.config.PipelineConfig` is in one class,
listed in :data:`KEY_CLASSES` (a test checks that every key of the schema is there):

* **free to change** (:attr:`KeyClass.FREE`): where the experiment lives, the horizon,
  validation, logging, checkpointing and retention. They change when and what is
  measured or kept, not what is trained; a resume applies them.
* **changes the run** (:attr:`KeyClass.RUN`): anything that trains differently (data,
  batching, loss, optimizer, schedules, accumulation, clipping, seed, precision). A
  resume that changes one is refused, with each changed key and its old and new value.
  A *fork* (``fork: true``, ``baton run --fork``) applies them on purpose: it continues
  from the checkpoint's weights, position and RNG states as the new config would have
  it at that point, and every checkpoint it writes records the fork.
* **fixed at the start** (:attr:`KeyClass.START`): the model and the weights the run
  started from. The checkpoint's weights only fit the model they were trained with,
  and ``load_from`` only applies to a fresh start, so these are refused even for a
  fork: start a new experiment instead.

:class:`ResumeCheck` applies this when a pipeline resumes: it sees the checkpoint before
anything is loaded, refuses, or turns the checkpoint into a fork's starting state.

Keys are compared as leaves of the resolved configs (``optim_wrapper.optimizer.lr``,
``param_scheduler.0.milestones``; a component whose ``type`` changed is one change); a
leaf takes the class of the nearest key of the table above it. docs/resume.md explains
the classes to users.
"""

import enum
import logging
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ValidationError

from baton.checkpoint import io
from baton.checkpoint.ref import CheckpointRef
from baton.config import PipelineConfig
from baton.errors import ResumeConfigError
from baton.strategy import ACCUMULATED_GRADS_KEY

if TYPE_CHECKING:  # the pipeline calls into this module, never the other way round
    from baton.optim import OptimWrapper
    from baton.pipeline import Pipeline
    from baton.strategy import SingleDeviceStrategy

logger = logging.getLogger(__name__)


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
    "train_data.pin_memory": FREE,
    "train_data.persistent_workers": FREE,
    "train_data.prefetch_factor": FREE,
    # Validation measures the model; it draws no random numbers and changes no weight.
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


def classify(key: str) -> KeyClass:
    """The class of a leaf key: that of the nearest table key above it (or itself).

    A key naming a whole section (``val_data`` switched on or off) takes the strictest
    class of the keys in it. A key the table does not know changes the run: that is
    the safe answer for a key added to the schema and forgotten here.
    """
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        found = KEY_CLASSES.get(".".join(parts[:end]))
        if found is not None:
            return found
    inside = [c for k, c in KEY_CLASSES.items() if k.startswith(key + ".")]
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
    """Every leaf that differs between a checkpoint's config and the current one.

    Args:
        saved: The checkpoint's ``meta['config']``.
        current: The resolved config of this run (``model_dump(mode='json')``).
    """
    found: list[tuple[str, Any, Any]] = []
    _diff(_resolved(saved), dict(current), "", found)
    changes = []
    for key, before, after in found:
        if key == "randomness.seed" and after is None:
            continue  # no seed configured: the run goes on with the one it drew
        changes.append(ConfigChange(key, before, after, classify(key)))
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


class ResumeCheck:
    """The callback that sees a checkpoint before it is loaded: compares its config with
    the pipeline's, refuses what cannot continue, and turns a fork's checkpoint into the
    state the new config has at the checkpoint's position."""

    def __init__(self, pipeline: "Pipeline", ref: CheckpointRef) -> None:
        self.pipeline = pipeline
        self.ref = ref
        self.name = Path(io.local_path(ref.uri) if io.is_local(ref.uri) else ref.uri).name
        self.fork: dict | None = None
        self.fork_changes: list[ConfigChange] = []

    def __call__(self, checkpoint: dict) -> None:
        cfg = self.pipeline.config
        meta = checkpoint.get("meta") if isinstance(checkpoint.get("meta"), dict) else {}
        saved = meta.get("config")
        if not isinstance(saved, dict):
            logger.warning(
                "%s records no config (not written by a baton pipeline): resuming it without "
                "checking that it describes the same run",
                self.name,
            )
            return
        changes = compare(saved, cfg.model_dump(mode="json"))
        fixed = [c for c in changes if c.kind is START]
        if fixed:
            raise ResumeConfigError(
                f"{self.name} was trained with a different model or starting weights "
                f"({'; '.join(map(str, fixed))}): a resume or a fork continues its weights, "
                "so these cannot change. Set them back, or start a new experiment (another "
                "experiment_name, or resume: never) with load_from naming the weights to "
                "start from"
            )
        refused = [c for c in changes if c.kind is RUN]
        horizon = self._horizon_problem(meta, saved, changes)
        if not refused and horizon is None:
            return
        if not cfg.fork:
            if horizon is not None and not refused:
                raise ResumeConfigError(f"{self.name}: {horizon}")
            raise ResumeConfigError(
                f"{self.name} was written with another config, and these keys change the "
                f"run: {'; '.join(map(str, refused))}. To continue this run, set them back; "
                f"to continue from {self.name} with the new values on purpose, fork it "
                "(baton run --fork, the flow's fork parameter, or fork: true), which is "
                "recorded in every checkpoint the fork writes"
            )
        # The fork records what changes the run, and the horizon when it was the reason.
        recorded = refused + [c for c in changes if horizon and c.key.startswith("train.max_")]
        self._fork(checkpoint, meta, changes, recorded)

    def _horizon_problem(self, meta: dict, saved: dict, changes: list[ConfigChange]) -> str | None:
        wrapper = self.pipeline.strategy.optim_wrapper
        if any(c.key == "optim_wrapper.accumulative_counts" for c in changes):
            return None  # a change of the run already: refused or forked as such
        old_max = (meta.get("accumulation") or {}).get("max_counts")
        if old_max is None:
            train = saved.get("train") or {}
            epoch_length = _saved_epoch_length(meta) or self.pipeline.epoch_length
            old_max = train.get("max_iters") or (train.get("max_epochs") or 0) * epoch_length
        return horizon_problem(
            counts=wrapper._accumulative_counts,
            at_iter=int(meta.get("iter", 0)),
            old_max=int(old_max),
            new_max=self.pipeline.max_iters,
        )

    def _fork(
        self,
        checkpoint: dict,
        meta: dict,
        changes: list[ConfigChange],
        recorded: list[ConfigChange],
    ) -> None:
        """Rewrite the loaded checkpoint into the fork's starting state (before loading)."""
        pipeline = self.pipeline
        strategy = pipeline.strategy
        changed = {c.key for c in changes}
        epoch, step = int(meta.get("epoch", 0)), int(meta.get("step_in_epoch", 0))
        source_iter = int(meta.get("iter", 0))
        old_length = _saved_epoch_length(meta)
        relaid = old_length is not None and old_length != pipeline.epoch_length
        regrouped = "optim_wrapper.accumulative_counts" in changed
        if step and any(needs_epoch_boundary(k) for k in changed):
            raise ResumeConfigError(
                f"{self.name} was taken inside epoch {epoch + 1}, and the fork changes the "
                "order of that epoch's batches (the data or the seed): fork from the "
                "checkpoint at the end of an epoch (resume: <its epoch_NNNN.pth>)"
            )
        if (relaid or regrouped) and checkpoint.get(ACCUMULATED_GRADS_KEY):
            raise ResumeConfigError(
                f"{self.name} was taken inside an accumulation window, and the fork changes "
                "how windows are cut: fork from a checkpoint at the end of an epoch whose "
                "last window is complete"
            )
        if relaid:
            # The epoch count is what carries over: the fork trains the epochs after it.
            meta["iter"] = epoch * pipeline.epoch_length
        self._start_fork_lineage()
        meta.setdefault("accumulation", {})["inner_count"] = int(meta.get("iter", 0))
        seed = pipeline.config.randomness.seed
        if seed is not None:
            meta["seed"] = seed  # the new seed orders the data from here on
        same_kind = _carry_optimizer_state(checkpoint, strategy.optim_wrapper, changed)
        # Schedulers restart from the new config and are stepped to this position.
        schedulers = getattr(strategy, "param_schedulers", None)
        if schedulers is not None:
            checkpoint["param_schedulers"] = [s.state_dict() for s in schedulers]
        self.fork_changes = recorded
        self.fork = {
            "from": self.name,
            "sha256": self.ref.sha256,
            "epoch": epoch,
            "iter": source_iter,
            "changes": [c.as_record() for c in recorded],
            "optimizer_state": "kept" if same_kind else "fresh",
        }

    def _start_fork_lineage(self) -> None:
        """A fork writes a lineage of its own (``baton ckpt list`` shows it as a fork):
        its checkpoints never overwrite or reorder those of the line it continues, and
        auto-resume follows it from then on."""
        store = self.pipeline.strategy.checkpoints
        source = store.find(self.ref.uri)
        head = store.head()
        started_here = (
            head is not None
            and not head.checkpoints
            and (
                (head.parent is not None and head.parent.sha256 == self.ref.sha256)
                or head.parent_outside == self.ref.uri
            )
        )
        if started_here:
            return  # this run already started a lineage from the checkpoint (a branch, a retry)
        store.start_lineage(
            parent=source or self.ref,
            reason="fork",
            config_hash=self.pipeline.config.config_hash,
        )


def _saved_epoch_length(meta: dict) -> int | None:
    """The epoch length of the run that wrote a checkpoint (``None`` before epoch 1 ends)."""
    epoch = int(meta.get("epoch", 0))
    if epoch <= 0 or "iter" not in meta:
        return None
    return (int(meta["iter"]) - int(meta.get("step_in_epoch", 0))) // epoch


def _carry_optimizer_state(checkpoint: dict, wrapper: "OptimWrapper", changed: set[str]) -> bool:
    """Rewrite ``checkpoint["optimizer"]`` for a fork; True if its moments were kept.

    Optimizer moments carry over when the optimizer is the same kind; its
    hyper-parameters are the new config's, as freshly built.
    """
    fresh = wrapper.state_dict()
    same_kind = not changed & {"optim_wrapper.type", "optim_wrapper.optimizer"}
    saved_state = checkpoint.get("optimizer")
    if same_kind and isinstance(saved_state, dict) and "param_groups" in saved_state:
        groups = saved_state["param_groups"]
        if len(groups) == len(fresh["param_groups"]):
            saved_state["param_groups"] = [
                {**new, "params": old["params"]}
                for old, new in zip(groups, fresh["param_groups"], strict=True)
            ]
        else:
            same_kind = False
    if not same_kind:
        checkpoint["optimizer"] = fresh
    return same_kind


def fast_forward_schedulers(strategy: "SingleDeviceStrategy", epoch_length: int) -> None:
    """Step fresh schedulers to the strategy's position, in the order the loop steps them
    (every iteration, then at each epoch's end), so a fork's schedule is the new config's
    at that point."""
    schedulers = getattr(strategy, "param_schedulers", [])
    per_iter = [s for s in schedulers if not s.by_epoch]
    per_epoch = [s for s in schedulers if s.by_epoch]
    for _ in range(strategy.epoch):
        for _ in range(epoch_length):
            for scheduler in per_iter:
                scheduler.step()
        for scheduler in per_epoch:
            scheduler.step()
    for _ in range(strategy.step_in_epoch):
        for scheduler in per_iter:
            scheduler.step()
