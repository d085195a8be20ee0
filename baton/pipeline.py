"""A configured pipeline, built and driven one step at a time.

:func:`build_pipeline` turns a validated :class:`~baton.config.PipelineConfig` into a
prepared strategy, data loaders and a loss. The step functions (:func:`find_resume_point`,
:func:`resume`, :func:`train_one_epoch`, :func:`validate`, :func:`save`) are what the
Prefect tasks call; :func:`run` chains them for a plain-Python run (tests, benchmarks).
"""

import importlib
import json
import logging
import math
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from baton import components, loop
from baton.checkpoint import io
from baton.checkpoint.ref import CheckpointName, CheckpointRef
from baton.checkpoint.store import CheckpointStore, RetentionPolicy
from baton.config import PipelineConfig
from baton.data import ResumableLoader, check_same_classes
from baton.errors import CheckpointMismatchError, CheckpointNotFoundError
from baton.strategy import SingleDeviceStrategy

logger = logging.getLogger(__name__)


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

    @property
    def epoch_length(self) -> int:
        """Iterations per epoch."""
        return len(self.train_loader)

    @property
    def finished(self) -> bool:
        """True once the horizon is reached."""
        return self.strategy.iter >= self.max_iters


def _loader(cfg, dataset, strategy: SingleDeviceStrategy) -> ResumableLoader:
    pin_memory = cfg.pin_memory
    if pin_memory is None:  # page-locked memory speeds up copies to a GPU only
        pin_memory = strategy.device.type == "cuda"
    return ResumableLoader(
        dataset,
        cfg.batch_size,
        shuffle=cfg.shuffle,
        seed=strategy.seed,
        drop_last=cfg.drop_last,
        num_workers=cfg.num_workers,
        pin_memory=pin_memory,
        persistent_workers=cfg.persistent_workers,
        prefetch_factor=cfg.prefetch_factor if cfg.num_workers else None,
    )


def build_pipeline(cfg: PipelineConfig) -> Pipeline:
    """Build strategy, model, optimizer, schedulers, loaders and loss from a config."""
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
        strategy,
    )
    val_loader = None
    if cfg.val_data is not None:
        dataset = components.build(cfg.val_data.dataset, extra_prefixes=prefixes)
        check_same_classes(train_loader.dataset, dataset)
        val_loader = _loader(cfg.val_data, dataset, strategy)
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


def resume(pipeline: Pipeline, ref: CheckpointRef) -> None:
    """Restore the pipeline from a checkpoint (architecture checked first)."""
    strategy = pipeline.strategy
    checkpoint = strategy.resume(ref.uri, callback=_check_architecture(pipeline.config, ref.uri))
    history = (checkpoint.get("meta") or {}).get("history")
    pipeline.history = list(history or [])
    # The data order follows the seed in effect, which a resume may have changed.
    pipeline.train_loader.seed = strategy.seed
    if pipeline.val_loader is not None:
        pipeline.val_loader.seed = strategy.seed


def load_weights(pipeline: Pipeline) -> None:
    """Load ``load_from`` weights (a fresh start from pretrained weights)."""
    spec = pipeline.config.load_from
    if spec is not None:
        pipeline.strategy.load_checkpoint(
            spec.uri,
            strict=spec.strict,
            revise_keys=[tuple(pair) for pair in spec.revise_keys],
        )


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
    )
    return {f"train/{k}": v for k, v in metrics.items()}


def should_validate(pipeline: Pipeline) -> bool:
    """Validate after this epoch? (every ``val_interval`` epochs and at the end)."""
    if pipeline.val_loader is None:
        return False
    epoch = pipeline.strategy.epoch
    return epoch % pipeline.config.train.val_interval == 0 or pipeline.finished


def validate(pipeline: Pipeline) -> dict[str, float]:
    """Validation metrics (``val/*``)."""
    if pipeline.val_loader is None:
        return {}
    metrics = loop.validate(pipeline.strategy, pipeline.val_loader, loss_fn=pipeline.loss_fn)
    return {f"val/{k}": v for k, v in metrics.items()}


def should_save(pipeline: Pipeline) -> bool:
    """Save after this epoch? (every ``checkpoint.interval`` epochs and at the end)."""
    return pipeline.strategy.epoch % pipeline.config.checkpoint.interval == 0 or pipeline.finished


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
        pipeline.history = [h for h in pipeline.history if h["iter"] != strategy.iter] + [record]
    if name is None:
        # Mid-epoch positions (a max_iters horizon, an emergency save) are named by iteration.
        name = (
            CheckpointName.for_iter(strategy.iter)
            if strategy.step_in_epoch
            else CheckpointName.for_epoch(strategy.epoch)
        )
    save_fn = strategy.save_checkpoint_async if background else strategy.save_checkpoint
    return save_fn(
        str(name),
        save_optimizer=cfg.checkpoint.save_optimizer,
        extra_ckpt={
            "meta": {
                "metrics": metrics,
                "architecture_hash": cfg.architecture_hash,
                "config": cfg.model_dump(mode="json"),
                "experiment_name": cfg.experiment_name,
                "history": pipeline.history,
            }
        },
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
