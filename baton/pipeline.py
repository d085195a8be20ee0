"""A configured pipeline, built and driven one step at a time.

:func:`build_pipeline` turns a validated :class:`~baton.config.PipelineConfig` into a
prepared strategy, data loaders and a loss. The step functions (:func:`find_resume_point`,
:func:`resume`, :func:`train_one_epoch`, :func:`validate`, :func:`save`) are what the
Prefect tasks call; :func:`run` chains them for a plain-Python run (tests, benchmarks).
"""

import functools
import importlib
import json
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from torch import nn

from baton import components, loop, randomness, resume_policy
from baton.checkpoint import io
from baton.checkpoint.ref import CheckpointName, CheckpointRef
from baton.checkpoint.store import CheckpointStore, RetentionPolicy
from baton.config import PipelineConfig
from baton.data import ResumableLoader
from baton.errors import CheckpointMismatchError, CheckpointNotFoundError, ResumeConfigError
from baton.strategy import ACCUMULATED_GRADS_KEY, SingleDeviceStrategy

logger = logging.getLogger(__name__)

T = TypeVar("T")

# ``meta`` key of the running train metrics in a checkpoint taken inside an epoch.
RUNNING_METRICS_KEY = "train_running"
# ``meta`` key of the forks in a checkpoint's ancestry, oldest first.
FORKS_KEY = "forks"


@dataclass
class Pipeline:
    """Everything a run needs, live in memory."""

    config: PipelineConfig
    strategy: SingleDeviceStrategy
    train_loader: ResumableLoader
    val_loader: ResumableLoader | None
    loss_fn: nn.Module
    max_epochs: int
    max_iters: int
    history: list[dict] = field(default_factory=list)
    # The current epoch's running train metrics; saved with checkpoints taken inside an
    # epoch, so that an epoch resumed half way reports all of its iterations.
    meter: loop.EpochMeter = field(default_factory=loop.EpochMeter)
    # The forks in this run's ancestry (see resume); every checkpoint records them.
    forks: list[dict] = field(default_factory=list)
    # The global random generators' states as this run sees them, between its steps.
    rng: randomness.TrainingGenerators = field(default_factory=randomness.TrainingGenerators)

    @property
    def epoch_length(self) -> int:
        """Iterations per epoch."""
        return len(self.train_loader)

    @property
    def finished(self) -> bool:
        """True once the horizon is reached."""
        return self.strategy.iter >= self.max_iters


def _loader(cfg, dataset, seed: int) -> ResumableLoader:
    return ResumableLoader(
        dataset,
        cfg.batch_size,
        shuffle=cfg.shuffle,
        seed=seed,
        drop_last=cfg.drop_last,
        num_workers=cfg.num_workers,
    )


def _with_training_generators(step: Callable[..., T]) -> Callable[..., T]:
    """Run a pipeline step with the pipeline's own random generators (see
    :class:`~baton.randomness.TrainingGenerators`): datasets and models may draw from
    the global ones, and nothing outside the run's steps shifts what they draw."""

    @functools.wraps(step)
    def run_step(pipeline: "Pipeline", *args, **kwargs) -> T:
        with pipeline.rng.active():
            return step(pipeline, *args, **kwargs)

    return run_step


def build_pipeline(cfg: PipelineConfig) -> Pipeline:
    """Build strategy, model, optimizer, schedulers, loaders and loss from a config.

    Seeding, and the random draws of building datasets and models, happen with the
    pipeline's own generators: the process's global random states are left as they were.
    """
    generators = randomness.TrainingGenerators()
    with generators.active():
        pipeline = _build(cfg)
    pipeline.rng = generators
    return pipeline


def _build(cfg: PipelineConfig) -> Pipeline:
    policy = cfg.checkpoint
    strategy = SingleDeviceStrategy(
        work_dir=cfg.work_dir,
        experiment_name=cfg.experiment_name,
        env_kwargs={"randomness": cfg.randomness.model_dump()},
        auto_scale_lr=cfg.auto_scale_lr.model_dump() if cfg.auto_scale_lr else None,
    )
    strategy.retention = RetentionPolicy(
        keep_last=policy.keep_last,
        keep_best=policy.keep_best,
        best_metric=policy.best_metric,
        best_mode=policy.best_mode,
    )
    strategy.config_hash = cfg.config_hash
    prefixes = cfg.allowed_modules
    train_loader = _loader(
        cfg.train_data,
        components.build(cfg.train_data.dataset, extra_prefixes=prefixes),
        strategy.seed,
    )
    val_loader = None
    if cfg.val_data is not None:
        dataset = components.build(cfg.val_data.dataset, extra_prefixes=prefixes)
        val_loader = _loader(cfg.val_data, dataset, strategy.seed)
    epoch_length = len(train_loader)
    if cfg.train.max_iters is not None:
        max_iters = cfg.train.max_iters
        max_epochs = math.ceil(max_iters / epoch_length)
    else:
        max_epochs = cfg.train.max_epochs
        max_iters = max_epochs * epoch_length
    wrapper = cfg.optim_wrapper.model_dump(exclude_none=True)
    if cfg.amp:
        wrapper["type"] = "AmpOptimWrapper"
    strategy.prepare(
        components.build(cfg.model, extra_prefixes=prefixes),
        optim_wrapper=wrapper,
        param_scheduler=[dict(s) for s in cfg.param_scheduler] or None,
        compile=cfg.compile if isinstance(cfg.compile, bool) else dict(cfg.compile),
        dispatch_kwargs={
            "max_epochs": max_epochs,
            "max_iters": max_iters,
            "epoch_length": epoch_length,
            "train_micro_batch_size_per_gpu": cfg.train_data.batch_size,
        },
    )
    loss_fn = components.build(cfg.loss, extra_prefixes=prefixes)
    return Pipeline(cfg, strategy, train_loader, val_loader, loss_fn, max_epochs, max_iters)


def preload() -> None:
    """Import now what building a pipeline imports on first use.

    ``torch.optim.Optimizer`` imports ``torch._dynamo`` when the first optimizer of a
    process is built (1.5 s here). A caller with time to spare (the CLI, while Prefect's
    server boots) pays it then instead of inside the run.
    """
    importlib.import_module("torch._dynamo")


def find_resume_point(cfg: PipelineConfig) -> CheckpointRef | None:
    """The checkpoint a run of ``cfg`` continues from, by its resume policy.

    ``'auto'``: the newest valid checkpoint of the experiment (``None`` if there is
    none); ``'never'``: ``None``; anything else: that checkpoint, which must exist.
    """
    if cfg.resume == "never":
        return None
    store = CheckpointStore(Path(cfg.work_dir) / cfg.experiment_name)
    if cfg.resume == "auto":
        return store.latest()
    committed = store.find(cfg.resume)
    if committed is not None:
        store.verify(committed)
        return committed
    if io.is_local(cfg.resume) and not io.local_path(cfg.resume).exists():
        raise CheckpointNotFoundError(f"resume checkpoint {cfg.resume!r} does not exist")
    size, digest = io.sha256_of(cfg.resume)
    return CheckpointRef(uri=cfg.resume, epoch=0, iter=0, size=size, sha256=digest)


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
    key (:mod:`baton.resume_policy`): keys that are free to change apply; a change of a
    key that changes the run is refused, unless the config forks (``fork: true``), in
    which case the run continues from the checkpoint as the new config would have it at
    that point, and the fork is recorded in every checkpoint it writes.

    Raises:
        ResumeConfigError: The configs differ in keys that change the run (and the config
            does not fork), or in the model or starting weights (never resumable).
    """
    strategy = pipeline.strategy
    check = _ResumeCheck(pipeline, ref)
    check_architecture = _check_architecture(pipeline.config, ref.uri)

    def callback(raw: dict) -> None:
        check(raw)
        check_architecture(raw)

    checkpoint = strategy.resume(ref.uri, callback=callback)
    meta = checkpoint.get("meta") or {}
    pipeline.history = list(meta.get("history") or [])
    pipeline.forks = list(meta.get(FORKS_KEY) or [])
    pipeline.meter = loop.EpochMeter()
    running = meta.get(RUNNING_METRICS_KEY)
    if strategy.step_in_epoch and running:
        pipeline.meter.load_state_dict(running)
    if check.fork is not None:
        _fast_forward_schedulers(pipeline)
        pipeline.forks.append(check.fork)
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


class _ResumeCheck:
    """The callback that sees a checkpoint before it is loaded: compares its config with
    the pipeline's, refuses what cannot continue, and turns a fork's checkpoint into the
    state the new config has at the checkpoint's position."""

    def __init__(self, pipeline: Pipeline, ref: CheckpointRef) -> None:
        self.pipeline = pipeline
        self.ref = ref
        self.name = Path(io.local_path(ref.uri) if io.is_local(ref.uri) else ref.uri).name
        self.fork: dict | None = None
        self.fork_changes: list[resume_policy.ConfigChange] = []

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
        changes = resume_policy.compare(saved, cfg.model_dump(mode="json"))
        fixed = [c for c in changes if c.kind is resume_policy.START]
        if fixed:
            raise ResumeConfigError(
                f"{self.name} was trained with a different model or starting weights "
                f"({'; '.join(map(str, fixed))}): a resume or a fork continues its weights, "
                "so these cannot change. Set them back, or start a new experiment (another "
                "experiment_name, or resume: never) with load_from naming the weights to "
                "start from"
            )
        refused = [c for c in changes if c.kind is resume_policy.RUN]
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

    def _horizon_problem(
        self, meta: dict, saved: dict, changes: list[resume_policy.ConfigChange]
    ) -> str | None:
        wrapper = self.pipeline.strategy.optim_wrapper
        if any(c.key == "optim_wrapper.accumulative_counts" for c in changes):
            return None  # a change of the run already: refused or forked as such
        old_max = (meta.get("accumulation") or {}).get("max_counts")
        if old_max is None:
            train = saved.get("train") or {}
            epoch_length = _saved_epoch_length(meta) or self.pipeline.epoch_length
            old_max = train.get("max_iters") or (train.get("max_epochs") or 0) * epoch_length
        return resume_policy.horizon_problem(
            counts=wrapper._accumulative_counts,
            at_iter=int(meta.get("iter", 0)),
            old_max=int(old_max),
            new_max=self.pipeline.max_iters,
        )

    def _fork(
        self,
        checkpoint: dict,
        meta: dict,
        changes: list[resume_policy.ConfigChange],
        recorded: list[resume_policy.ConfigChange],
    ) -> None:
        """Rewrite the loaded checkpoint into the fork's starting state (before loading)."""
        pipeline = self.pipeline
        strategy = pipeline.strategy
        wrapper = strategy.optim_wrapper
        changed = {c.key for c in changes}
        epoch, step = int(meta.get("epoch", 0)), int(meta.get("step_in_epoch", 0))
        source_iter = int(meta.get("iter", 0))
        old_length = _saved_epoch_length(meta)
        relaid = old_length is not None and old_length != pipeline.epoch_length
        regrouped = "optim_wrapper.accumulative_counts" in changed
        if step and any(resume_policy.needs_epoch_boundary(k) for k in changed):
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
        self._refuse_overtaking(int(meta["iter"]) if relaid else source_iter)
        meta.setdefault("accumulation", {})["inner_count"] = int(meta.get("iter", 0))
        seed = pipeline.config.randomness.seed
        if seed is not None:
            meta["seed"] = seed  # the new seed orders the data from here on
        # Optimizer moments carry over when the optimizer is the same kind; its
        # hyper-parameters are the new config's, as freshly built.
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

    def _refuse_overtaking(self, fork_iter: int) -> None:
        """A fork inside the checkpoint's own experiment must be the newest line in it:
        its checkpoints would otherwise overwrite later ones of the same names, or be
        ordered before the checkpoint they fork from."""
        store = self.pipeline.strategy.checkpoints
        source = store.find(self.ref.uri)
        if source is None:
            return
        later = [r for r in store.list() if r.iter > source.iter]
        if later or fork_iter < source.iter:
            reason = (
                f"it has later checkpoints ({Path(later[-1].uri).name} is the newest), which "
                "the fork would overwrite"
                if later
                else "the fork's shorter epochs would order its checkpoints before it"
            )
            raise ResumeConfigError(
                f"cannot fork {self.name} inside its experiment: {reason}. Fork into a new "
                f"experiment instead (another experiment_name, resume: {self.ref.uri}, "
                "fork: true)"
            )


def _saved_epoch_length(meta: dict) -> int | None:
    """The epoch length of the run that wrote a checkpoint (``None`` before epoch 1 ends)."""
    epoch = int(meta.get("epoch", 0))
    if epoch <= 0 or "iter" not in meta:
        return None
    return (int(meta["iter"]) - int(meta.get("step_in_epoch", 0))) // epoch


def _fast_forward_schedulers(pipeline: Pipeline) -> None:
    """Step fresh schedulers to the pipeline's position, in the order the loop steps them
    (every iteration, then at each epoch's end), so a fork's schedule is the new config's
    at that point."""
    strategy = pipeline.strategy
    schedulers = getattr(strategy, "param_schedulers", [])
    per_iter = [s for s in schedulers if not s.by_epoch]
    per_epoch = [s for s in schedulers if s.by_epoch]
    for _ in range(strategy.epoch):
        for _ in range(pipeline.epoch_length):
            for scheduler in per_iter:
                scheduler.step()
        for scheduler in per_epoch:
            scheduler.step()
    for _ in range(strategy.step_in_epoch):
        for scheduler in per_iter:
            scheduler.step()


@_with_training_generators
def load_weights(pipeline: Pipeline) -> None:
    """Load ``load_from`` weights (a fresh start from pretrained weights)."""
    spec = pipeline.config.load_from
    if spec is not None:
        pipeline.strategy.load_checkpoint(
            spec.uri,
            strict=spec.strict,
            revise_keys=[tuple(pair) for pair in spec.revise_keys],
        )


@_with_training_generators
def train_one_epoch(
    pipeline: Pipeline, *, on_iteration=None, stop_at: int | None = None
) -> dict[str, float]:
    """Train the current epoch (or its rest) and return ``train/*`` metrics.

    Args:
        on_iteration: Called with the running metrics after every iteration.
        stop_at: Stop at this iteration instead of the horizon (to replay a run up to
            a known position).
    """
    strategy = pipeline.strategy
    interval = pipeline.config.checkpoint.interval_iters
    if strategy.step_in_epoch == 0:
        pipeline.meter = loop.EpochMeter()

    def hook(running: dict) -> None:
        if (
            interval
            and strategy.iter % interval == 0
            and strategy.step_in_epoch < pipeline.epoch_length
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
    return {f"train/{k}": v for k, v in metrics.items()}


def should_validate(pipeline: Pipeline) -> bool:
    """Validate after this epoch? (every ``val_interval`` epochs and at the end)."""
    if pipeline.val_loader is None:
        return False
    epoch = pipeline.strategy.epoch
    return epoch % pipeline.config.train.val_interval == 0 or pipeline.finished


@_with_training_generators
def validate(pipeline: Pipeline) -> dict[str, float]:
    """Validation metrics (``val/*``)."""
    if pipeline.val_loader is None:
        return {}
    metrics = loop.validate(pipeline.strategy, pipeline.val_loader, loss_fn=pipeline.loss_fn)
    return {f"val/{k}": v for k, v in metrics.items()}


def should_save(pipeline: Pipeline) -> bool:
    """Save after this epoch? (every ``checkpoint.interval`` epochs and at the end)."""
    return pipeline.strategy.epoch % pipeline.config.checkpoint.interval == 0 or pipeline.finished


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
    record = {"epoch": strategy.epoch, "iter": strategy.iter, **metrics}
    if name is None:
        # Keyed by both: a fork to another epoch length reaches an iteration count again.
        position = (strategy.epoch, strategy.iter)
        pipeline.history = [h for h in pipeline.history if (h["epoch"], h["iter"]) != position] + [
            record
        ]
    if name is None:
        # Mid-epoch positions (a max_iters horizon, an emergency save) are named by iteration.
        name = (
            CheckpointName.for_iter(strategy.iter)
            if strategy.step_in_epoch
            else CheckpointName.for_epoch(strategy.epoch)
        )
    meta = {
        "metrics": metrics,
        "architecture_hash": cfg.architecture_hash,
        "config": cfg.model_dump(mode="json"),
        "experiment_name": cfg.experiment_name,
        "history": pipeline.history,
    }
    if strategy.step_in_epoch:
        meta[RUNNING_METRICS_KEY] = pipeline.meter.state_dict()
    if pipeline.forks:
        meta[FORKS_KEY] = pipeline.forks
    save_fn = strategy.save_checkpoint_async if background else strategy.save_checkpoint
    return save_fn(
        str(name), save_optimizer=cfg.checkpoint.save_optimizer, extra_ckpt={"meta": meta}
    )


def metrics_path(experiment_dir: Path) -> Path:
    """The experiment's ``metrics.jsonl``."""
    return Path(experiment_dir) / "metrics.jsonl"


def append_metrics(experiment_dir: Path, kind: str, record: dict) -> None:
    """Append one record (``kind`` is ``'epoch'`` or ``'iteration'``) to ``metrics.jsonl``."""
    path = metrics_path(experiment_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": time.time(), "kind": kind, **record}, sort_keys=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")


def read_epoch_history(experiment_dir: Path) -> list[dict]:
    """The last record of each epoch in ``metrics.jsonl`` (lines cut by a crash are skipped)."""
    path = metrics_path(experiment_dir)
    if not path.exists():
        return []
    by_epoch: dict[int, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("kind") == "epoch":
            by_epoch[record["epoch"]] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def run(cfg: PipelineConfig) -> tuple[Pipeline, CheckpointRef | None]:
    """Train a whole pipeline in this process, resuming as the config says."""
    pipeline = build_pipeline(cfg)
    with pipeline.strategy.checkpoints.lock():
        ref = find_resume_point(cfg)
        if ref is not None:
            resume(pipeline, ref)
        else:
            load_weights(pipeline)
        while not pipeline.finished:
            metrics = train_one_epoch(pipeline)
            if should_validate(pipeline):
                metrics.update(validate(pipeline))
            if should_save(pipeline):
                if cfg.checkpoint.async_save and not pipeline.finished:
                    save(pipeline, metrics, background=True)  # committed when written
                else:
                    ref = save(pipeline, metrics)
            position = {"epoch": pipeline.strategy.epoch, "iter": pipeline.strategy.iter}
            append_metrics(pipeline.strategy.experiment_dir, "epoch", {**position, **metrics})
            logger.info("epoch %d: %s", pipeline.strategy.epoch, metrics)
    return pipeline, ref
