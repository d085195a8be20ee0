"""``SingleDeviceStrategy``: mmengine's single-device strategy API, restartable.

The class keeps mmengine's signatures keyword for keyword, so it swaps in for
``mmengine._strategy.SingleDeviceStrategy``, and it loads mmengine's checkpoints. It
delegates: the experiment folder and its store are :class:`~baton.experiment.Experiment`'s,
``env_kwargs`` are applied by :mod:`baton.engine.environment`, components are assembled by
:mod:`baton.engine.assemble` (through the registry, :mod:`baton.build`), what goes into a
checkpoint and how it is put back is :mod:`baton.checkpoint.content`, and writing and
committing is :mod:`baton.checkpoint.writer`.

The module is longer than the project's 400 lines on purpose: what is left is mmengine's
API surface (about twenty public members), and their docstrings are where its semantics
(and where baton departs from mmengine) are written down; splitting the class would
scatter that contract.

Where mmengine is weak, this class does better:

* the constructor creates no folders and no global logger; each strategy has its own
  logger, and the experiment keeps its name (no timestamp appended);
* no shared mutable defaults: a resumed seed never leaks into later strategies;
* ``save_checkpoint`` writes atomically (temp file, fsync, rename), records size and
  sha256, moves optimizer state to the CPU, never mutates ``extra_ckpt``, and returns a
  :class:`~baton.checkpoint.CheckpointRef`;
* ``load_checkpoint`` loads with ``weights_only=True``, accepts ``{'state_dict': ...}``,
  ``{'model': ...}`` and bare state dicts, and its default ``revise_keys`` escapes the dot;
* ``resume`` restores every RNG state and the loop position, and works without
  ``meta['iter']``;
* ``auto_scale_lr`` also rescales schedulers that were built before ``prepare``.
"""

import copy
import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import torch
from torch import nn

from baton import randomness
from baton.checkpoint import content
from baton.checkpoint import format as ckpt_format
from baton.checkpoint.loaders import load_uri
from baton.checkpoint.ref import CheckpointRef
from baton.checkpoint.store import CheckpointStore, RetentionPolicy
from baton.checkpoint.writer import CheckpointWriter
from baton.engine import assemble, environment, fingerprint
from baton.engine.convert import revert_sync_batchnorm
from baton.errors import CheckpointError
from baton.experiment.folder import Experiment
from baton.optim.schedulers import _ParamScheduler
from baton.optim.wrapper import OptimWrapper

_LOG_KEYS = ("log_level", "log_file", "file_mode")
# Kept here for callers of the first releases; the checkpoint layout lives in content.
ACCUMULATED_GRADS_KEY = content.ACCUMULATED_GRADS_KEY


class _LazyFileHandler(logging.FileHandler):
    """A file handler that creates its folder and file on the first record only; not
    while ``in_place`` says the experiment's folder was moved away (the records would
    make a folder at the old path)."""

    def __init__(self, filename: str, mode: str, in_place=lambda: True):
        super().__init__(filename, mode, encoding="utf-8", delay=True)
        self._in_place = in_place

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None and not self._in_place():
            return  # the run stops with ExperimentMovedError; the log stays with the folder
        super().emit(record)

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


class SingleDeviceStrategy:
    """Train on one device (a GPU when available, else the CPU).

    Args:
        work_dir: Folder of all experiments; an experiment lives in
            ``work_dir/<experiment_name>``.
        experiment_name: A stable name (a timestamp when ``None``). Unlike mmengine, no
            timestamp is appended, so a restarted run finds its checkpoints.
        env_kwargs: ``randomness`` (``seed``, ``deterministic``, ``diff_rank_seed``),
            ``cudnn_benchmark``, ``mp_cfg`` (``mp_start_method``, ``opencv_num_threads``:
            applied as mmengine does), ``resource_limit``; ``dist_cfg`` only empty (see
            :mod:`baton.engine.environment`).
        log_kwargs: ``log_level``, ``log_file`` (default: a file in :attr:`log_dir`),
            ``file_mode``.
        auto_scale_lr: ``{'enable': bool, 'base_batch_size': int}``.

    The folder belongs to :attr:`experiment` (:class:`~baton.experiment.Experiment`), for
    ``work_dir/<experiment_name>``, keeping every checkpoint as mmengine does; a pipeline
    gives its own (with the config's retention policy) through :meth:`in_experiment`.

    Raises:
        TypeError: An unknown key in ``env_kwargs``, ``randomness``, ``mp_cfg`` or
            ``log_kwargs``.
        ValueError: An unsafe experiment name, a bad seed or ``auto_scale_lr``, or a
            non-empty ``dist_cfg``.
    """

    def __init__(
        self,
        *,
        work_dir: str = "work_dirs",
        experiment_name: str | None = None,
        env_kwargs: dict | None = None,
        log_kwargs: dict | None = None,
        auto_scale_lr: dict | None = None,
    ):
        self._timestamp = time.strftime("%Y%m%d_%H%M%S")
        name = experiment_name if experiment_name is not None else self._timestamp
        self.experiment = Experiment(work_dir, name)
        self._env_kwargs = copy.deepcopy(env_kwargs or {})
        self._seed, self._randomness = environment.set_up(self._env_kwargs, rank=self.rank)
        self.logger = self._build_logger(
            **environment.check_keys(dict(log_kwargs or {}), _LOG_KEYS, "log_kwargs")
        )
        self._auto_scale_lr = assemble.check_auto_scale_lr(auto_scale_lr)
        self._writer = CheckpointWriter(self.logger)
        self.dispatch_kwargs: dict = {}
        self._prepared = False
        self.config_hash: str | None = None
        # Loop position: completed epochs, completed iterations, iterations of the
        # current (unfinished) epoch. The loop advances it; checkpoints record it.
        self.epoch = 0
        self.iter = 0
        self.step_in_epoch = 0

    @classmethod
    def in_experiment(cls, experiment: Experiment, **kwargs) -> "SingleDeviceStrategy":
        """baton's addition: a strategy given its experiment (folder, checkpoint store,
        retention policy) once, instead of one made from ``work_dir`` and
        ``experiment_name``; ``kwargs`` are the constructor's others."""
        strategy = cls(work_dir=str(experiment.work_dir), experiment_name=experiment.name, **kwargs)
        strategy.experiment = experiment
        return strategy

    # environment ----------------------------------------------------------------------

    def _build_logger(
        self, log_level: int | str = "INFO", log_file: str | None = None, file_mode: str = "a"
    ) -> logging.Logger:
        # A logger object of our own, not registered in logging's global table: two
        # strategies never share handlers, and dropping a strategy frees its logger.
        logger = logging.Logger(f"baton.strategy.{self.experiment.name}", log_level)
        logger.parent = logging.getLogger("baton")
        log_file = log_file or str(Path(self.log_dir) / f"{self._timestamp}.log")
        handler = _LazyFileHandler(log_file, file_mode, self.experiment.in_place)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        return logger

    # properties -----------------------------------------------------------------------

    @property
    def work_dir(self) -> str:
        """Absolute path of the folder holding all experiments."""
        return str(self.experiment.work_dir)

    @property
    def experiment_name(self) -> str:
        """The experiment's stable, sanitised name."""
        return self.experiment.name

    @property
    def experiment_dir(self) -> Path:
        """``work_dir/<experiment_name>``: checkpoints, manifest, run logs."""
        return self.experiment.root

    @property
    def log_dir(self) -> str:
        """The folder of this run's logs (created on the first log record)."""
        return str(self.experiment.strategy_log_dir(self._timestamp))

    @property
    def timestamp(self) -> str:
        """When this strategy was created (``YYYYmmdd_HHMMSS``)."""
        return self._timestamp

    @property
    def seed(self) -> int:
        """The seed in effect."""
        return self._seed

    @property
    def randomness(self) -> dict:
        """A copy of the randomness settings in effect."""
        return dict(self._randomness)

    @property
    def rank(self) -> int:
        """Always 0: one process."""
        return 0

    @property
    def world_size(self) -> int:
        """Always 1: one process."""
        return 1

    @property
    def distributed(self) -> bool:
        """Always False."""
        return False

    @property
    def launcher(self) -> str:
        """Always ``'none'`` (mmengine's name for a non-distributed launch)."""
        return "none"

    @property
    def device(self) -> torch.device:
        """The training device: the current CUDA device if there is one, else the CPU."""
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @property
    def checkpoints(self) -> CheckpointStore:
        """The experiment's committed checkpoints (its store, built once)."""
        return self.experiment.store

    @property
    def retention(self) -> RetentionPolicy:
        """What rotation keeps: the experiment's retention policy (settable)."""
        return self.experiment.retention

    @retention.setter
    def retention(self, policy: RetentionPolicy) -> None:
        if not isinstance(policy, RetentionPolicy):
            raise TypeError(f"retention must be a RetentionPolicy, got {type(policy).__name__}")
        self.experiment.store.retention = policy

    # prepare --------------------------------------------------------------------------

    def prepare(
        self,
        model: nn.Module | dict,
        *,
        optim_wrapper: OptimWrapper | torch.optim.Optimizer | dict | None = None,
        param_scheduler: _ParamScheduler | dict | list | None = None,
        compile: dict | bool = False,
        dispatch_kwargs: dict | None = None,
    ):
        """Build and place the model, optimizer wrapper and schedulers.

        Args:
            model: A module, or a component dict (``{'type': ..., ...}``).
            optim_wrapper: A wrapper, an optimizer, or a dict with ``type``
                (``OptimWrapper``/``AmpOptimWrapper``), ``optimizer``,
                ``accumulative_counts``, ``clip_grad``.
            param_scheduler: A scheduler, a dict, or a list of either (mmengine's names).
            compile: ``True`` or a dict (``target`` method plus ``torch.compile``
                arguments); the caller's dict is not modified.
            dispatch_kwargs: ``max_epochs``, ``max_iters``, ``epoch_length``,
                ``train_micro_batch_size_per_gpu``.

        Returns:
            ``model``, ``[model, optim_wrapper]`` or ``[model, optim_wrapper,
            param_schedulers]``; a second call returns the same objects.

        Raises:
            ValueError: Accumulation without ``max_iters``, schedulers without an
                optimizer, a bad component dict.
        """
        if self._prepared:
            return self._prepared_components()
        if dispatch_kwargs is not None:
            self.dispatch_kwargs.update(dispatch_kwargs)
        if param_scheduler is not None and optim_wrapper is None:
            raise ValueError("param_scheduler needs an optim_wrapper to schedule")

        model = assemble.model(model)
        if hasattr(model, "init_weights"):
            model.init_weights()
        model = self._wrap_model(self.convert_model(model).to(self.device))
        self.model = self._compile_model(model, compile)

        if optim_wrapper is not None:
            self.optim_wrapper = assemble.optim_wrapper(optim_wrapper, self.model)
            assemble.scale_lr(
                self._auto_scale_lr,
                self.optim_wrapper,
                assemble.built_schedulers(param_scheduler),
                self._batch_size(),
                self.logger,
            )
            counts = self.optim_wrapper._accumulative_counts
            if counts > 1:
                self.optim_wrapper.initialize_count_status(self.model, 0, self._max_iters(counts))
        if param_scheduler is not None:
            self.param_schedulers = assemble.param_schedulers(
                param_scheduler, self.optim_wrapper, self.dispatch_kwargs
            )
        self._prepared = True
        return self._prepared_components()

    def _wrap_model(self, model: nn.Module) -> nn.Module:
        """The model as training calls it: as it is on one device (``DDPStrategy`` wraps it)."""
        return model

    @property
    def unwrapped_model(self) -> nn.Module:
        """The model without a data-parallel wrapper: what checkpoints hold and load into."""
        return self.model

    def _prepared_components(self):
        items = [self.model]
        if hasattr(self, "optim_wrapper"):
            items.append(self.optim_wrapper)
        if hasattr(self, "param_schedulers"):
            items.append(self.param_schedulers)
        return items[0] if len(items) == 1 else items

    def _max_iters(self, counts: int) -> int:
        if "max_iters" not in self.dispatch_kwargs:
            raise ValueError(
                f"accumulative_counts is {counts}, so dispatch_kwargs must give 'max_iters' "
                "(the run's total iterations) to scale the last, shorter window"
            )
        return self.dispatch_kwargs["max_iters"]

    def _batch_size(self) -> int | None:
        """The global training batch size ``auto_scale_lr`` scales by, if given."""
        per_device = self.dispatch_kwargs.get("train_micro_batch_size_per_gpu")
        return None if per_device is None else round(self.world_size * per_device)

    def _compile_model(self, model: nn.Module, compile: dict | bool) -> nn.Module:
        if compile is False:
            return model
        options = {} if compile is True else dict(compile)
        target = options.pop("target", "forward")
        randomness.sync_inductor_determinism()
        setattr(model, target, torch.compile(getattr(model, target), **options))
        self.logger.info("compiled model.%s; the first iterations will be slow", target)
        return model

    # conversion -----------------------------------------------------------------------

    def convert_model(self, model: nn.Module) -> nn.Module:
        """Replace every SyncBatchNorm (torch's or mmcv's) by a BatchNorm for 2D-5D input.

        The new layers share the original parameters and buffers and keep
        ``requires_grad`` and ``training``. Returns the converted root.
        """
        return revert_sync_batchnorm(model)

    # checkpoints ----------------------------------------------------------------------

    def _require_prepared(self, what: str) -> None:
        if not hasattr(self, "model"):
            raise RuntimeError(f"call prepare(model, ...) before {what}()")

    def save_checkpoint(
        self,
        filename: str,
        *,
        save_optimizer: bool = True,
        save_param_scheduler: bool = True,
        extra_ckpt: dict | None = None,
        callback: Callable | None = None,
    ) -> CheckpointRef:
        """Write a checkpoint atomically and return its reference.

        A bare file name (``'epoch_0003.pth'``) is written into the experiment's
        ``checkpoints/`` folder and committed to its manifest, in the newest lineage
        (whose files after the first are named ``L2-epoch_0003.pth``), with retention
        applied within that lineage; a path or URI is written where it says. Weights and optimizer state are moved
        to the CPU. ``extra_ckpt`` is copied, never modified; its ``meta`` entries
        (``epoch``, ``iter``, ``metrics``...) join the checkpoint's ``meta``.
        ``callback(checkpoint)`` may edit the dict just before it is written.
        """
        checkpoint, target = self._start_save(
            "save_checkpoint", filename, save_optimizer, save_param_scheduler, extra_ckpt, callback
        )
        return self._writer.write(self.checkpoints, checkpoint, target)

    def save_checkpoint_async(
        self,
        filename: str,
        *,
        save_optimizer: bool = True,
        save_param_scheduler: bool = True,
        extra_ckpt: dict | None = None,
        callback: Callable | None = None,
    ) -> Future:
        """Like :meth:`save_checkpoint`, but write in the background; returns a future
        of the :class:`CheckpointRef`.

        Training waits only for a snapshot of the state: on the CPU a ``fork`` (the child
        writes a copy-on-write view of memory, so the stall is the fork, and the extra
        memory is the pages training changes meanwhile, at most one copy of the state);
        on a GPU a copy to host memory, written by a thread. The checkpoint is committed
        to the manifest only once it is completely on disk, so a crash during the write
        leaves the previous checkpoint as the latest. One save runs at a time: a second
        call first waits for the first.
        """
        checkpoint, target = self._start_save(
            "save_checkpoint_async",
            filename,
            save_optimizer,
            save_param_scheduler,
            extra_ckpt,
            callback,
        )
        return self._writer.write_in_background(self.checkpoints, checkpoint, target)

    def _start_save(
        self,
        what: str,
        filename: str,
        save_optimizer: bool,
        save_param_scheduler: bool,
        extra_ckpt: dict | None,
        callback: Callable | None,
    ) -> tuple[dict, str]:
        """What both saves do first: wait for a background save still running (it commits
        first), build the checkpoint dict, let the callback edit it, resolve the target."""
        self._require_prepared(what)
        self.wait_for_checkpoints()
        checkpoint = self.checkpoint_dict(
            save_optimizer=save_optimizer,
            save_param_scheduler=save_param_scheduler,
            extra_ckpt=extra_ckpt,
        )
        if callback is not None:
            callback(checkpoint)
        return checkpoint, self._writer.target(self.checkpoints, filename)

    def checkpoint_dict(
        self,
        *,
        save_optimizer: bool = True,
        save_param_scheduler: bool = True,
        extra_ckpt: dict | None = None,
    ) -> dict:
        """baton's addition: the dict :meth:`save_checkpoint` would write now, kept in
        memory (``baton verify`` compares a replayed state with a committed file)."""
        self._require_prepared("checkpoint_dict")
        return content.build(
            self,
            save_optimizer,
            save_param_scheduler,
            extra_ckpt,
            environment=self.environment_fingerprint(),
        )

    def environment_fingerprint(self) -> dict:
        """baton's addition: the environment this strategy trains in, as every checkpoint
        records it (``meta['environment']``, see :mod:`baton.engine.fingerprint`)."""
        return fingerprint.environment_fingerprint(
            self.device, config_hash=self.config_hash, world_size=self.world_size
        )

    def wait_for_checkpoints(self) -> CheckpointRef | None:
        """Wait for a background save; return its reference.

        ``None`` if there was none, or if it failed. A failed background save (its writer
        killed, the disk full) is logged as an error and committed nothing, but it loses
        nothing else: the state it was writing is still the live one, and the next save
        writes it (metrics history included). Failing the caller instead would make it
        rebuild the live state from an older checkpoint and forget what came between.
        """
        return self._writer.wait()

    def load_checkpoint(
        self,
        filename: str,
        *,
        map_location: str | Callable = "cpu",
        strict: bool = False,
        revise_keys: list = [(r"^module\.", "")],  # noqa: B006 - mmengine's signature; never mutated
        callback: Callable | None = None,
    ) -> dict:
        """Load model weights from a file or URI into the prepared model.

        Accepts ``{'state_dict': ...}``, ``{'model': ...}`` and bare state dicts, loaded
        with ``weights_only=True`` (see :func:`baton.trusted_loading` for trusted legacy
        files). ``callback(checkpoint)`` runs on the raw dict before keys are revised;
        ``revise_keys`` ``(pattern, replacement)`` pairs apply in order.

        Args:
            map_location: As for ``torch.load``; ``'default'`` is the strategy's device.
            strict: Raise on missing, unexpected or mis-shaped keys instead of warning.

        Returns:
            The checkpoint without its weights (``meta``, ``optimizer``...).

        Raises:
            CheckpointMismatchError: ``strict=True`` and the keys do not match.
        """
        self._require_prepared("load_checkpoint")
        location = self.device if map_location == "default" else map_location
        self.logger.info("loading checkpoint %s", filename)
        raw = load_uri(filename, location)
        if callback is not None:
            callback(raw)
        weights, rest = ckpt_format.split_weights(raw, filename)
        for pattern, replacement in revise_keys:
            weights = {re.sub(pattern, replacement, key): value for key, value in weights.items()}
        content.load_weights(
            self.unwrapped_model, weights, strict=strict, source=filename, logger=self.logger
        )
        return rest

    def resume(
        self,
        filename: str,
        *,
        resume_optimizer: bool = True,
        resume_param_scheduler: bool = True,
        map_location: str | Callable = "default",
        callback: Callable | None = None,
    ) -> dict:
        """Restore a run: weights, optimizer, schedulers, RNG states and loop position.

        A seed in the checkpoint that differs from the configured one wins, with a
        warning. Files without ``meta['iter']`` (mmengine's strategy does not write it)
        resume at ``epoch * epoch_length`` when the epoch length is known, else at 0.

        Returns:
            The checkpoint without weights, optimizer and scheduler states.

        Raises:
            CheckpointMismatchError: The optimizer or scheduler section is missing (pass
                ``resume_optimizer=False``/``resume_param_scheduler=False``) or does not fit.
        """
        checkpoint = self.load_checkpoint(filename, map_location=map_location, callback=callback)
        self.restore(
            checkpoint,
            source=filename,
            resume_optimizer=resume_optimizer,
            resume_param_scheduler=resume_param_scheduler,
        )
        return checkpoint

    def restore(
        self,
        checkpoint: dict,
        *,
        source: str,
        resume_optimizer: bool = True,
        resume_param_scheduler: bool = True,
    ) -> None:
        """baton's addition: the second half of :meth:`resume`, for a checkpoint already
        loaded by :meth:`load_checkpoint` (its sections are removed as they are restored).

        A caller that looks at the checkpoint first (``baton.run.steps.resume`` resumes a
        file saved without optimizer state with a fresh optimizer) loads it once.
        """
        meta = checkpoint.get("meta") or {}
        self._warn_environment_changes(meta, source)
        wrapper = getattr(self, "optim_wrapper", None)
        if resume_optimizer and wrapper is not None:
            content.restore_optimizer(wrapper, checkpoint, source)
        if resume_param_scheduler and hasattr(self, "param_schedulers"):
            states = checkpoint.pop("param_schedulers", None)
            content.restore_schedulers(self.param_schedulers, states, source)
        self._restore_randomness(meta)
        self._restore_position(meta, source)
        grads_restored = content.restore_gradients(self.unwrapped_model, checkpoint)
        accumulation = meta.get("accumulation") or {}
        if wrapper is not None and wrapper._accumulative_counts > 1:
            counts = accumulation.get("inner_count", self.iter)
            # A window the saved run's horizon closed early was stepped: nothing was lost.
            closed_by_horizon = counts == accumulation.get("max_counts")
            wrapper.initialize_count_status(
                self.model,
                counts,
                self._max_iters(wrapper._accumulative_counts),
                grads_restored=grads_restored or closed_by_horizon,
            )
        elif wrapper is not None and "inner_count" in accumulation:
            # Without accumulation the counters steer nothing, but a checkpoint records
            # them: put back, a resumed run's next checkpoint equals an uninterrupted
            # run's entry for entry (baton verify compares them all).
            wrapper.initialize_count_status(
                self.model,
                int(accumulation["inner_count"]),
                int(accumulation.get("max_counts", wrapper._max_counts)),
            )
        self.logger.info("resumed from %s at epoch %d, iter %d", source, self.epoch, self.iter)

    def _warn_environment_changes(self, meta: dict, source: str) -> None:
        """Warn, naming each field, when the checkpoint was trained in an environment
        that differs in a way that breaks bitwise equality (docs/resume.md)."""
        changes = fingerprint.fingerprint_changes(
            meta.get(fingerprint.ENVIRONMENT_KEY), self.environment_fingerprint()
        )
        broken = fingerprint.breaking(changes)
        if broken:
            self.logger.warning(
                "%s was trained in another environment, so this run cannot continue bitwise "
                "equal to an uninterrupted one: %s",
                source,
                fingerprint.describe(broken),
            )

    def _restore_position(self, meta: dict, source: str) -> None:
        self.epoch = int(meta.get("epoch", 0))
        self.step_in_epoch = int(meta.get("step_in_epoch", 0))
        if "iter" in meta:
            self.iter = int(meta["iter"])
        else:
            epoch_length = self.dispatch_kwargs.get("epoch_length")
            self.iter = self.epoch * epoch_length if epoch_length else 0
            self.logger.warning(
                "%s has no meta['iter']; resuming at iteration %d", source, self.iter
            )

    def _restore_randomness(self, meta: dict) -> None:
        resumed_seed = meta.get("seed")
        if resumed_seed is not None and resumed_seed != self._seed:
            self.logger.warning(
                "the checkpoint's seed %s differs from the configured seed %s; the "
                "checkpoint's wins",
                resumed_seed,
                self._seed,
            )
            self._seed = int(resumed_seed)
            self._randomness = {**self._randomness, "seed": int(resumed_seed)}
        if "rng" in meta:
            try:
                randomness.restore_rng_state(meta["rng"])
            except (KeyError, TypeError, ValueError, RuntimeError) as err:
                raise CheckpointError(f"the checkpoint's RNG state is unreadable: {err}") from err
        elif resumed_seed is not None:
            # mmengine files carry the seed but no RNG state: re-seed, as mmengine does.
            randomness.seed_everything(self._seed, deterministic=self._randomness["deterministic"])
