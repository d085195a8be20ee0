"""Applying the resume policy at a checkpoint: :class:`ResumeCheck` refuses a resume that
changes the run, or turns the checkpoint into a fork's starting state (a lineage of its
own, optimizer state carried when the optimizer is the same kind, schedulers rebuilt and
fast-forwarded to the checkpoint's position by :func:`fast_forward_schedulers`).
"""

import logging
from pathlib import Path

from baton.checkpoint import io
from baton.checkpoint.content import ACCUMULATED_GRADS_KEY
from baton.checkpoint.ref import CheckpointRef
from baton.config.schema import PipelineConfig
from baton.engine.strategy import SingleDeviceStrategy
from baton.errors import ResumeConfigError
from baton.optim.wrapper import OptimWrapper
from baton.run.resume_policy.horizon import HorizonMove, move_horizon
from baton.run.resume_policy.keys import (
    RUN,
    START,
    ConfigChange,
    compare,
    horizon_problem,
    needs_epoch_boundary,
)

# One channel for the package, the one it has logged on since it was a single module.
logger = logging.getLogger("baton.resume_policy")


class ResumeCheck:
    """The callback that sees a checkpoint before it is loaded: compares its config with
    the run's, refuses what cannot continue, and turns a fork's checkpoint into the state
    the new config has at the checkpoint's position.

    Args:
        config: The config of the run that resumes.
        strategy: Its prepared strategy (optimizer wrapper, schedulers, checkpoint store).
        ref: The checkpoint it resumes.
        epoch_length: Iterations per epoch of the run that resumes.
        max_iters: Its horizon, in iterations.
    """

    def __init__(
        self,
        config: PipelineConfig,
        strategy: SingleDeviceStrategy,
        ref: CheckpointRef,
        *,
        epoch_length: int,
        max_iters: int,
    ) -> None:
        self.config = config
        self.strategy = strategy
        self.ref = ref
        self.epoch_length = epoch_length
        self.max_iters = max_iters
        self.name = Path(io.local_path(ref.uri) if io.is_local(ref.uri) else ref.uri).name
        self.fork: dict | None = None
        self.fork_changes: list[ConfigChange] = []
        # Schedulers across a moved horizon: steps to take again once they are loaded.
        self.horizon_move: HorizonMove | None = None

    def __call__(self, checkpoint: dict) -> None:
        cfg = self.config
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
        move = None if refused else self._move_horizon(checkpoint, meta, changes)
        if move is not None and move.problems:
            horizon = " ".join(filter(None, (horizon, self._schedulers_problem(move, changes))))
        if not refused and horizon is None:
            if move is not None:
                checkpoint["param_schedulers"] = move.states
                self.horizon_move = move
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
        wrapper = self.strategy.optim_wrapper
        if any(c.key == "optim_wrapper.accumulative_counts" for c in changes):
            return None  # a change of the run already: refused or forked as such
        old_max = (meta.get("accumulation") or {}).get("max_counts")
        if old_max is None:
            train = saved.get("train") or {}
            epoch_length = _saved_epoch_length(meta) or self.epoch_length
            old_max = train.get("max_iters") or (train.get("max_epochs") or 0) * epoch_length
        return horizon_problem(
            counts=wrapper._accumulative_counts,
            at_iter=int(meta.get("iter", 0)),
            old_max=int(old_max),
            new_max=self.max_iters,
        )

    def _move_horizon(
        self, checkpoint: dict, meta: dict, changes: list[ConfigChange]
    ) -> HorizonMove | None:
        """The saved scheduler states at the new horizon, when the horizon moved and the
        run has iterations left to train (see :mod:`baton.run.resume_policy.horizon`)."""
        schedulers = getattr(self.strategy, "param_schedulers", None)
        states = checkpoint.get("param_schedulers")
        if (
            not schedulers
            or not isinstance(states, list)
            or len(states) != len(schedulers)
            or not all(isinstance(state, dict) for state in states)
            or not any(c.key.startswith("train.max_") for c in changes)
            or int(meta.get("iter", 0)) >= self.max_iters
        ):
            return None
        epoch_end = int(meta.get("epoch", 0)) > 0 and int(meta.get("step_in_epoch", 0)) == 0
        validated = any(key.startswith("val/") for key in meta.get("metrics") or {})
        return move_horizon(states, schedulers, epoch_end=epoch_end, validated=validated)

    def _schedulers_problem(self, move: HorizonMove, changes: list[ConfigChange]) -> str:
        moved = "; ".join(str(c) for c in changes if c.key.startswith("train.max_"))
        return (
            f"moving the horizon ({moved}) cannot continue exactly: "
            f"{'; '.join(move.problems)}. Keep the horizon, or continue from {self.name} "
            "with the new horizon on purpose with a fork (baton run --fork, the flow's fork "
            "parameter, or fork: true), which is recorded in every checkpoint it writes; "
            "to extend runs exactly, give such schedulers their T_max, total_steps or end"
        )

    def _fork(
        self,
        checkpoint: dict,
        meta: dict,
        changes: list[ConfigChange],
        recorded: list[ConfigChange],
    ) -> None:
        """Rewrite the loaded checkpoint into the fork's starting state (before loading)."""
        strategy = self.strategy
        changed = {c.key for c in changes}
        epoch, step = int(meta.get("epoch", 0)), int(meta.get("step_in_epoch", 0))
        source_iter = int(meta.get("iter", 0))
        old_length = _saved_epoch_length(meta)
        relaid = old_length is not None and old_length != self.epoch_length
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
            meta["iter"] = epoch * self.epoch_length
        meta.setdefault("accumulation", {})["inner_count"] = int(meta.get("iter", 0))
        seed = self.config.randomness.seed
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

    def start_lineage(self) -> None:
        """A fork writes a lineage of its own (``baton ckpt list`` shows it as a fork):
        its checkpoints never overwrite or reorder those of the line it continues, and
        auto-resume follows it from then on. Started by the fork's first save
        (``baton.run.steps.save``), once every check has passed: a refused or stopped fork
        leaves no lineage."""
        store = self.strategy.checkpoints
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
            config_hash=self.config.config_hash,
            config=self.config.model_dump(mode="json"),
        )


def _saved_epoch_length(meta: dict) -> int | None:
    """The epoch length of the run that wrote a checkpoint (``None`` before epoch 1 ends)."""
    epoch = int(meta.get("epoch", 0))
    if epoch <= 0 or "iter" not in meta:
        return None
    return (int(meta["iter"]) - int(meta.get("step_in_epoch", 0))) // epoch


def _carry_optimizer_state(checkpoint: dict, wrapper: OptimWrapper, changed: set[str]) -> bool:
    """Rewrite ``checkpoint["optimizer"]`` for a fork; True if its moments were kept.

    Optimizer moments carry over when the optimizer is the same kind; its
    hyper-parameters are the new config's, as freshly built. A checkpoint saved without
    optimizer state (``checkpoint.save_optimizer: false``) has none to keep.
    """
    fresh = wrapper.state_dict()
    same_kind = not changed & {"optim_wrapper.type", "optim_wrapper.optimizer"}
    saved_state = checkpoint.get("optimizer")
    if saved_state is None:
        return False
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


def fast_forward_schedulers(strategy: SingleDeviceStrategy, epoch_length: int) -> None:
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
