"""The live pipeline: everything a run holds in memory, and how a config builds it.

:func:`build_pipeline` turns a validated :class:`~baton.config.PipelineConfig` into a
prepared strategy, data loaders and a loss, checking on the way what validation could not
know (the horizon and checkpoint plan in real iterations, lazy parameters). The steps
(:mod:`baton.run.steps`) act on the :class:`Pipeline` it returns; :mod:`baton.run.pipeline`
restores and runs one.
"""

import importlib
import math
from dataclasses import dataclass, field

from torch import nn

from baton import build, randomness
from baton.config.plan import check_plan
from baton.config.schema import PipelineConfig
from baton.data.loader import ResumableLoader, check_same_classes
from baton.engine.ddp import DDPStrategy
from baton.engine.strategy import SingleDeviceStrategy
from baton.experiment.folder import Experiment
from baton.run import loop
from baton.run.resume_policy import ResumeCheck, world_size
from baton.trust.allowances import Trust
from baton.trust.quotas import Quotas, has_lazy_parameters


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
    # The epoch whose validation last stepped the plateau schedulers: once per epoch,
    # however often that epoch is validated (a retried task, an evaluation).
    scored_epoch: int | None = None
    # The current epoch's running train metrics; saved with checkpoints taken inside an
    # epoch, so that an epoch resumed half way reports all of its iterations.
    meter: loop.EpochMeter = field(default_factory=loop.EpochMeter)
    # The forks in this run's ancestry (see resume); every checkpoint records them.
    forks: list[dict] = field(default_factory=list)
    # A fork resumed but not yet recorded: its lineage starts at its first save, so that a
    # fork refused or stopped before it commits anything leaves no lineage behind.
    pending_fork: ResumeCheck | None = None
    # The global random generators' states as this run sees them, between its steps.
    rng: randomness.TrainingGenerators = field(default_factory=randomness.TrainingGenerators)
    # Where it trains, for the run's log (baton.run.pipeline.restore says why it is here).
    trains_in: str = "this process"

    @property
    def experiment(self) -> Experiment:
        """The experiment the pipeline trains (its folder, store and logs)."""
        return self.strategy.experiment

    @property
    def epoch_length(self) -> int:
        """Iterations per epoch."""
        return len(self.train_loader)

    @property
    def finished(self) -> bool:
        """True once the horizon is reached."""
        return self.strategy.iter >= self.max_iters

    def close(self) -> None:
        """Stop the loaders' worker processes (a later epoch starts new ones)."""
        for loader in (self.train_loader, self.val_loader):
            if loader is not None:
                loader.close()


def _loader(
    cfg, dataset, strategy: SingleDeviceStrategy, batch_size: int | None = None
) -> ResumableLoader:
    """A split's loader; ``batch_size`` is the global batch (default: the split's
    ``batch_size`` per process), shared by the strategy's processes."""
    pin_memory = cfg.pin_memory
    if pin_memory is None:  # page-locked memory speeds up copies to a GPU only
        pin_memory = strategy.device.type == "cuda"
    return ResumableLoader(
        dataset,
        batch_size or cfg.batch_size * strategy.world_size,
        shuffle=cfg.shuffle,
        seed=strategy.seed,
        drop_last=cfg.drop_last,
        num_workers=cfg.num_workers,
        pin_memory=pin_memory,
        persistent_workers=cfg.persistent_workers,
        prefetch_factor=cfg.prefetch_factor if cfg.num_workers else None,
        rank=strategy.rank,
        world_size=strategy.world_size,
    )


def build_pipeline(
    cfg: PipelineConfig,
    experiment: Experiment | None = None,
    *,
    trust: Trust | None = None,
    resuming: dict | None = None,
) -> Pipeline:
    """Build strategy, model, optimizer, schedulers, loaders and loss from a config.

    Seeding, and the random draws of building datasets and models, happen with the
    pipeline's own generators: the process's global random states are left as they were.

    Args:
        experiment: The config's experiment, if the caller holds it already.
        trust: The operator's trust, if the caller read it already (default: the
            environment's, or the run's when it holds one).
        resuming: The ``meta`` of the checkpoint the pipeline will resume: its global batch
            is kept (:mod:`baton.run.resume_policy.world_size`).

    With ``launcher.nproc`` above 1 this builds one rank of the run: the process must have
    been started as one (``baton.run.ranks`` starts them).
    """
    trust = trust or Trust.from_environment()
    generators = randomness.TrainingGenerators()
    with generators.active():
        pipeline = _build(cfg, experiment or Experiment.of(cfg, trust), trust, resuming)
    pipeline.rng = generators
    return pipeline


def _strategy(cfg: PipelineConfig, experiment: Experiment) -> SingleDeviceStrategy:
    """The config's strategy: one device, or one rank of ``launcher.nproc``."""
    kwargs = {
        "env_kwargs": {"randomness": cfg.randomness.model_dump()},
        "auto_scale_lr": cfg.auto_scale_lr.model_dump() if cfg.auto_scale_lr else None,
    }
    if cfg.launcher.nproc == 1:
        return SingleDeviceStrategy.in_experiment(experiment, **kwargs)
    if cfg.launcher.backend != "auto":
        kwargs["env_kwargs"]["dist_cfg"] = {"backend": cfg.launcher.backend}
    strategy = DDPStrategy.in_experiment(experiment, **kwargs)
    if strategy.world_size != cfg.launcher.nproc:
        raise RuntimeError(
            f"launcher.nproc is {cfg.launcher.nproc} but this process is one of "
            f"{strategy.world_size}; start the run with baton run or its flow"
        )
    return strategy


def _build(
    cfg: PipelineConfig, experiment: Experiment, trust: Trust, resuming: dict | None
) -> Pipeline:
    strategy = _strategy(cfg, experiment)
    strategy.config_hash = cfg.config_hash
    global_batch = world_size.global_batch(cfg, strategy.world_size, resuming)
    train_loader = _loader(
        cfg.train_data,
        build.build(cfg.train_data.dataset, "dataset", trust=trust),
        strategy,
        global_batch,
    )
    train_loader.check_split()
    val_loader = None
    if cfg.val_data is not None:
        dataset = build.build(cfg.val_data.dataset, "dataset", trust=trust)
        check_same_classes(train_loader.dataset, dataset)
        val_loader = _loader(cfg.val_data, dataset, strategy)
    epoch_length = len(train_loader)
    if cfg.train.max_iters is not None:
        max_iters = cfg.train.max_iters
        max_epochs = math.ceil(max_iters / epoch_length)
    else:
        max_epochs = cfg.train.max_epochs
        max_iters = max_epochs * epoch_length
    # What validation could not know: the horizon and the checkpoint plan in real
    # iterations, before the model is allocated.
    quotas = Quotas.of(trust, folder=experiment.work_dir)
    check_plan(quotas, cfg, epoch_length)
    wrapper = cfg.optim_wrapper.model_dump(exclude_none=True, exclude={"clip_grad"})
    if cfg.optim_wrapper.clip_grad is not None:
        wrapper["clip_grad"] = cfg.optim_wrapper.clip_grad.kwargs()
    if cfg.amp:
        wrapper["type"] = "AmpOptimWrapper"
    model = build.build(cfg.model, "model", trust=trust)
    # Before the real model sees an input, and before it is placed, compiled or given an
    # optimizer: lazy parameters are counted on a meta copy run on a batch shaped like
    # the training data's, without allocating them (Quotas.check_model).
    example_input = None
    if has_lazy_parameters(model):
        example_input = loop.forward_input(model, train_loader.meta_batch())
    counted = quotas.check_model(model, example_input=example_input)
    strategy.prepare(
        model,
        optim_wrapper=wrapper,
        param_scheduler=[dict(s) for s in cfg.param_scheduler] or None,
        compile=cfg.compile
        if isinstance(cfg.compile, bool)
        else cfg.compile.model_dump(exclude_none=True),
        dispatch_kwargs={
            "max_epochs": max_epochs,
            "max_iters": max_iters,
            "epoch_length": epoch_length,
            # auto_scale_lr scales by the global batch: this over the world size.
            "train_micro_batch_size_per_gpu": global_batch / strategy.world_size,
        },
    )
    # The plan's bytes follow the model as far as it is known: with lazy parameters,
    # the sizes the dry run gave them.
    check_plan(quotas, cfg, epoch_length, counted)
    loss_fn = build.build(cfg.loss, "loss", trust=trust)
    return Pipeline(cfg, strategy, train_loader, val_loader, loss_fn, max_epochs, max_iters)


def preload() -> None:
    """Import now what building a pipeline imports on first use.

    ``torch.optim.Optimizer`` imports ``torch._dynamo`` when the first optimizer of a
    process is built (1.5 s here). A caller with time to spare (the CLI, while Prefect's
    server boots) pays it then instead of inside the run.
    """
    importlib.import_module("torch._dynamo")
