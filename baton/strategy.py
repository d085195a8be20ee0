"""``SingleDeviceStrategy``: mmengine's single-device strategy API, restartable.

The class keeps mmengine's signatures keyword for keyword, so it swaps in for
``mmengine._strategy.SingleDeviceStrategy``, and it loads mmengine's checkpoints. It is
thin: what goes into a checkpoint is decided here, how it is written lives in
:mod:`baton.checkpoint`, and the pieces (optimizer wrappers, schedulers, RNG handling,
SyncBN conversion) live in their own modules.

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
import resource
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from baton import build, randomness
from baton.checkpoint import format as ckpt_format
from baton.checkpoint import io
from baton.checkpoint.loaders import load_uri
from baton.checkpoint.ref import CheckpointRef
from baton.checkpoint.store import CheckpointStore, RetentionPolicy
from baton.convert import revert_sync_batchnorm
from baton.errors import CheckpointError, CheckpointMismatchError
from baton.optim import AmpOptimWrapper, OptimWrapper
from baton.schedulers import _ParamScheduler

_ENV_KEYS = ("randomness", "cudnn_benchmark", "mp_cfg", "dist_cfg", "resource_limit")
_RANDOMNESS_KEYS = ("seed", "deterministic", "diff_rank_seed")
_LOG_KEYS = ("log_level", "log_file", "file_mode")
_AUTO_SCALE_KEYS = ("enable", "base_batch_size")
_WRAPPER_TYPES = {"OptimWrapper": OptimWrapper, "AmpOptimWrapper": AmpOptimWrapper}
_WRAPPER_KEYS = ("type", "optimizer", "accumulative_counts", "clip_grad", "loss_scale", "dtype")
# Top-level key of the gradients saved inside an accumulation window.
ACCUMULATED_GRADS_KEY = "accumulated_grads"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_experiment_name(name: str) -> str:
    """Return ``name`` if it is a safe folder name, else raise ``ValueError`` saying why."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise ValueError(
            f"experiment_name {name!r} is not allowed: use 1-128 letters, digits, '.', '_' "
            "or '-', starting with a letter or digit, with no path separators and no '..'"
        )
    return name


class _LazyFileHandler(logging.FileHandler):
    """A file handler that creates its folder and file on the first record only."""

    def __init__(self, filename: str, mode: str):
        super().__init__(filename, mode, encoding="utf-8", delay=True)

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
            ``cudnn_benchmark``, ``mp_cfg``, ``dist_cfg``, ``resource_limit``.
        log_kwargs: ``log_level``, ``log_file`` (default: a file in :attr:`log_dir`),
            ``file_mode``.
        auto_scale_lr: ``{'enable': bool, 'base_batch_size': int}``.

    Raises:
        TypeError: An unknown key in ``env_kwargs``, ``randomness`` or ``log_kwargs``.
        ValueError: An unsafe experiment name or a bad ``auto_scale_lr``.
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
        self._work_dir = Path(work_dir).expanduser().absolute()
        self._experiment_name = check_experiment_name(
            experiment_name if experiment_name is not None else self._timestamp
        )
        self._env_kwargs = copy.deepcopy(env_kwargs or {})
        self._setup_env(**self._check_keys(self._env_kwargs, _ENV_KEYS, "env_kwargs"))
        self.logger = self._build_logger(
            **self._check_keys(dict(log_kwargs or {}), _LOG_KEYS, "log_kwargs")
        )
        self._auto_scale_lr = self._check_auto_scale_lr(auto_scale_lr)
        self.dispatch_kwargs: dict = {}
        self._prepared = False
        self.retention = RetentionPolicy()
        self.config_hash: str | None = None
        # Loop position: completed epochs, completed iterations, iterations of the
        # current (unfinished) epoch. The loop advances it; checkpoints record it.
        self.epoch = 0
        self.iter = 0
        self.step_in_epoch = 0

    # environment ----------------------------------------------------------------------

    @staticmethod
    def _check_keys(given: dict, accepted: tuple[str, ...], what: str) -> dict:
        unknown = sorted(set(given) - set(accepted))
        if unknown:
            raise TypeError(
                f"{what} got unknown key(s) {unknown}; accepted keys: {', '.join(accepted)}"
            )
        return given

    def _setup_env(
        self,
        *,
        randomness: dict | None = None,
        cudnn_benchmark: bool = False,
        mp_cfg: dict | None = None,
        dist_cfg: dict | None = None,
        resource_limit: int = 4096,
    ) -> None:
        self._mp_cfg = dict(mp_cfg or {})
        # One device, one process: there is nothing to distribute; kept for the record.
        self._dist_cfg = dict(dist_cfg or {})
        if cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = max(resource_limit, soft)
        if hard != resource.RLIM_INFINITY:
            wanted = min(wanted, hard)
        if wanted != soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        settings = self._check_keys(dict(randomness or {}), _RANDOMNESS_KEYS, "randomness")
        self._set_randomness(**settings)

    def _set_randomness(
        self,
        seed: int | None = None,
        diff_rank_seed: bool = False,
        deterministic: bool = False,
    ) -> None:
        if seed is None:
            seed = randomness.draw_seed()
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"randomness.seed must be a non-negative int or None, got {seed!r}")
        effective = seed + self.rank if diff_rank_seed else seed
        randomness.seed_everything(effective, deterministic=deterministic)
        self._seed = effective
        self._randomness = {
            "seed": seed,
            "diff_rank_seed": diff_rank_seed,
            "deterministic": deterministic,
        }

    def _build_logger(
        self, log_level: int | str = "INFO", log_file: str | None = None, file_mode: str = "a"
    ) -> logging.Logger:
        # A logger object of our own, not registered in logging's global table: two
        # strategies never share handlers, and dropping a strategy frees its logger.
        logger = logging.Logger(f"baton.strategy.{self._experiment_name}", log_level)
        logger.parent = logging.getLogger("baton")
        log_file = log_file or str(Path(self.log_dir) / f"{self._timestamp}.log")
        handler = _LazyFileHandler(log_file, file_mode)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        return logger

    @staticmethod
    def _check_auto_scale_lr(cfg: dict | None) -> dict | None:
        if cfg is None:
            return None
        if not isinstance(cfg, dict):
            raise ValueError(f"auto_scale_lr must be a dict, got {type(cfg).__name__}")
        unknown = sorted(set(cfg) - set(_AUTO_SCALE_KEYS))
        if unknown:
            raise ValueError(
                f"auto_scale_lr got unknown key(s) {unknown}; use enable and base_batch_size"
            )
        if cfg.get("enable", False):
            base = cfg.get("base_batch_size")
            if not isinstance(base, int) or base <= 0:
                raise ValueError(
                    "auto_scale_lr is enabled but 'base_batch_size' is missing or not a "
                    f"positive int (got {base!r})"
                )
        return dict(cfg)

    # properties -----------------------------------------------------------------------

    @property
    def work_dir(self) -> str:
        """Absolute path of the folder holding all experiments."""
        return str(self._work_dir)

    @property
    def experiment_name(self) -> str:
        """The experiment's stable, sanitised name."""
        return self._experiment_name

    @property
    def experiment_dir(self) -> Path:
        """``work_dir/<experiment_name>``: checkpoints, manifest, run logs."""
        return self._work_dir / self._experiment_name

    @property
    def log_dir(self) -> str:
        """The folder of this run's logs (created on the first log record)."""
        return str(self.experiment_dir / "runs" / self._timestamp)

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
        """The experiment's committed checkpoints."""
        return CheckpointStore(self.experiment_dir, retention=self.retention)

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

        model = self._build_model(model)
        if hasattr(model, "init_weights"):
            model.init_weights()
        model = self.convert_model(model).to(self.device)
        self.model = self._compile_model(model, compile)

        if optim_wrapper is not None:
            self.optim_wrapper = self._build_optim_wrapper(optim_wrapper, self.model)
            self._scale_lr(_built_schedulers(param_scheduler))
            counts = self.optim_wrapper._accumulative_counts
            if counts > 1:
                self.optim_wrapper.initialize_count_status(self.model, 0, self._max_iters(counts))
        if param_scheduler is not None:
            self.param_schedulers = self._build_param_schedulers(param_scheduler)
        self._prepared = True
        return self._prepared_components()

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

    @staticmethod
    def _build_model(model: nn.Module | dict) -> nn.Module:
        if isinstance(model, nn.Module):
            return model
        if isinstance(model, dict):
            return build.build(model, "model")
        raise TypeError(f"model must be an nn.Module or a dict, got {type(model).__name__}")

    def _compile_model(self, model: nn.Module, compile: dict | bool) -> nn.Module:
        if compile is False:
            return model
        options = {} if compile is True else dict(compile)
        target = options.pop("target", "forward")
        randomness.sync_inductor_determinism()
        setattr(model, target, torch.compile(getattr(model, target), **options))
        self.logger.info("compiled model.%s; the first iterations will be slow", target)
        return model

    def _build_optim_wrapper(self, cfg, model: nn.Module) -> OptimWrapper:
        if isinstance(cfg, OptimWrapper):
            return cfg
        if isinstance(cfg, torch.optim.Optimizer):
            return OptimWrapper(cfg)
        if not isinstance(cfg, dict):
            raise TypeError(
                f"optim_wrapper must be an OptimWrapper, an Optimizer or a dict, got "
                f"{type(cfg).__name__}"
            )
        args = dict(cfg)
        unknown = sorted(set(args) - set(_WRAPPER_KEYS))
        if unknown:
            raise ValueError(
                f"optim_wrapper got unsupported key(s) {unknown}; supported: "
                f"{', '.join(_WRAPPER_KEYS)}"
            )
        kind = args.pop("type", "OptimWrapper")
        wrapper_cls = _WRAPPER_TYPES.get(kind, kind) if isinstance(kind, str) else kind
        if not (isinstance(wrapper_cls, type) and issubclass(wrapper_cls, OptimWrapper)):
            raise ValueError(
                f"optim_wrapper type {kind!r} is unknown; use {' or '.join(_WRAPPER_TYPES)}"
            )
        if "optimizer" not in args:
            raise ValueError("optim_wrapper needs an 'optimizer', e.g. {'type': 'SGD', 'lr': 0.1}")
        optimizer = args.pop("optimizer")
        if isinstance(optimizer, dict):
            optimizer = build.build(optimizer, "optimizer", params=model.parameters())
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer built a {type(optimizer).__name__}, not an Optimizer")
        # By keyword: AmpOptimWrapper's first parameter is loss_scale, as in mmengine.
        return wrapper_cls(optimizer=optimizer, **args)

    def _build_param_schedulers(self, cfg) -> list[_ParamScheduler]:
        items = cfg if isinstance(cfg, (list, tuple)) else [cfg]
        built = []
        for item in items:
            if isinstance(item, _ParamScheduler):
                built.append(item)
            elif isinstance(item, dict):
                built.append(
                    build.build_scheduler(
                        item,
                        self.optim_wrapper,
                        epoch_length=self.dispatch_kwargs.get("epoch_length"),
                        max_epochs=self.dispatch_kwargs.get("max_epochs"),
                        max_iters=self.dispatch_kwargs.get("max_iters"),
                    )
                )
            else:
                raise TypeError(
                    f"param_scheduler items must be schedulers or dicts, got {type(item).__name__}"
                )
        return built

    def _scale_lr(self, built: list[_ParamScheduler]) -> None:
        """Scale every learning rate by ``batch_size / base_batch_size``.

        Schedulers built before this call recorded the unscaled values; their base and
        last values are scaled too (mmengine refuses this case with a RuntimeError).
        """
        cfg = self._auto_scale_lr
        if not cfg or not cfg.get("enable", False):
            return
        if "train_micro_batch_size_per_gpu" not in self.dispatch_kwargs:
            raise ValueError(
                "auto_scale_lr is enabled, so dispatch_kwargs must give "
                "'train_micro_batch_size_per_gpu' (the training batch size)"
            )
        batch = self.world_size * self.dispatch_kwargs["train_micro_batch_size_per_gpu"]
        ratio = float(batch) / float(cfg["base_batch_size"])
        self.logger.info(
            "auto_scale_lr: batch size %d against base %d, learning rates x %.4g",
            batch,
            cfg["base_batch_size"],
            ratio,
        )
        for group in self.optim_wrapper.param_groups:
            group["lr"] *= ratio
            if "initial_lr" in group:
                group["initial_lr"] *= ratio
        for scheduler in built:
            if scheduler.param_name == "lr":
                if hasattr(scheduler, "base_values"):  # ReduceOnPlateau keeps none
                    scheduler.base_values = [v * ratio for v in scheduler.base_values]
                scheduler._last_value = [v * ratio for v in scheduler._last_value]

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

    def _resolve_target(self, filename: str) -> str:
        """A bare file name goes into the experiment's checkpoint folder, named for the
        newest lineage (``L2-epoch_0003.pth``), so that no lineage writes over another's
        committed file; an explicit path into that folder is refused if it would."""
        store = self.checkpoints
        if "://" not in filename and "/" not in filename and filename not in ("", ".", ".."):
            return str(store.target(filename))
        if not io.is_local(filename):
            return filename
        target = str(io.local_path(filename).absolute())
        store.check_target(target)
        return target

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
        size, digest = io.save(checkpoint, target)
        return self._commit(target, checkpoint["meta"], size, digest)

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
        meta = checkpoint["meta"]
        writing = io.save_in_background(checkpoint, target)

        def commit() -> CheckpointRef:
            size, digest = writing.result()
            return self._commit(target, meta, size, digest)

        self._pending_save = self._committer().submit(commit)
        return self._pending_save

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
        checkpoint = self._checkpoint_dict(save_optimizer, save_param_scheduler, extra_ckpt)
        if callback is not None:
            callback(checkpoint)
        return checkpoint, self._resolve_target(filename)

    def wait_for_checkpoints(self) -> CheckpointRef | None:
        """Wait for a background save; return its reference.

        ``None`` if there was none, or if it failed. A failed background save (its writer
        killed, the disk full) is logged as an error and committed nothing, but it loses
        nothing else: the state it was writing is still the live one, and the next save
        writes it (metrics history included). Failing the caller instead would make it
        rebuild the live state from an older checkpoint and forget what came between.
        """
        pending, self._pending_save = getattr(self, "_pending_save", None), None
        if pending is None:
            return None
        try:
            return pending.result()
        except (CheckpointError, OSError) as err:
            self.logger.error(
                "%s; nothing was committed, the next checkpoint will hold this state", err
            )
            return None

    def _committer(self) -> ThreadPoolExecutor:
        if getattr(self, "_commit_thread", None) is None:
            self._commit_thread = ThreadPoolExecutor(1, thread_name_prefix="baton-commit")
        return self._commit_thread

    def _checkpoint_dict(
        self, save_optimizer: bool, save_param_scheduler: bool, extra_ckpt: dict | None
    ) -> dict:
        """What goes into a checkpoint (the strategy decides; checkpoint.io writes it)."""
        extra = copy.deepcopy(extra_ckpt) if extra_ckpt else {}
        wrapper = getattr(self, "optim_wrapper", None)
        meta = ckpt_format.make_meta(
            epoch=self.epoch,
            iter=self.iter,
            step_in_epoch=self.step_in_epoch,
            seed=self.seed,
            rng=randomness.capture_rng_state(),
            config_hash=self.config_hash,
            accumulation=(
                # max_counts: the horizon the last, shorter window was cut to (a resume
                # that moves the horizon needs it to tell whether it can be exact).
                {"inner_count": wrapper.inner_count, "max_counts": wrapper._max_counts}
                if wrapper
                else None
            ),
            extra_meta=extra.pop("meta", None),
        )
        checkpoint: dict = {"meta": meta, "state_dict": ckpt_format.to_cpu(self.model.state_dict())}
        if save_optimizer and wrapper is not None:
            checkpoint["optimizer"] = ckpt_format.to_cpu(wrapper.state_dict())
        if save_param_scheduler and hasattr(self, "param_schedulers"):
            checkpoint["param_schedulers"] = [s.state_dict() for s in self.param_schedulers]
        if wrapper is not None and wrapper.in_window():
            # Saved inside an accumulation window: keep the gradients gathered so far,
            # so that resuming here is exact (mmengine drops them).
            checkpoint[ACCUMULATED_GRADS_KEY] = {
                name: p.grad.detach().cpu()
                for name, p in self.model.named_parameters()
                if p.grad is not None
            }
        checkpoint.update(extra)
        return checkpoint

    def _commit(self, target: str, meta: dict, size: int, digest: str) -> CheckpointRef:
        metrics = {k: float(v) for k, v in (meta.get("metrics") or {}).items()}
        position = {"epoch": int(meta.get("epoch", 0)), "iter": int(meta.get("iter", 0))}
        store = self.checkpoints
        # Only files of the experiment's own checkpoints/ folder enter its manifest (and
        # its newest lineage); a checkpoint written elsewhere is returned, not committed.
        if io.is_local(target) and store.owns(target):
            ref = store.commit(target, size=size, sha256=digest, metrics=metrics, **position)
        else:
            ref = CheckpointRef(uri=target, size=size, sha256=digest, metrics=metrics, **position)
        self.logger.info("saved checkpoint %s (%d bytes)", target, size)
        return ref

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
        self._load_model_weights(weights, strict=strict, source=filename)
        return rest

    def _load_model_weights(self, weights: dict, *, strict: bool, source: str) -> None:
        own = self.model.state_dict()
        missing = [k for k in own if k not in weights]
        unexpected = [k for k in weights if k not in own]
        mismatched = [
            k
            for k in weights
            if k in own
            and isinstance(weights[k], torch.Tensor)
            and weights[k].shape != own[k].shape
        ]
        problems = []
        if missing:
            problems.append(f"missing keys {missing}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected}")
        if mismatched:
            shapes = [
                f"{k}: {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched
            ]
            problems.append(f"mis-shaped keys (checkpoint vs model) {shapes}")
        if problems and strict:
            raise CheckpointMismatchError(
                f"{source!r} does not fit the model: {'; '.join(problems)}. Pass strict=False "
                "to load the keys that match"
            )
        usable = {k: v for k, v in weights.items() if k in own and k not in mismatched}
        self.model.load_state_dict(usable, strict=False)
        if problems:
            self.logger.warning("loaded %s partially: %s", source, "; ".join(problems))

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
        meta = checkpoint.get("meta") or {}
        wrapper = getattr(self, "optim_wrapper", None)
        if resume_optimizer and wrapper is not None:
            if "optimizer" not in checkpoint:
                raise CheckpointMismatchError(
                    f"{filename!r} has no optimizer state; pass resume_optimizer=False to "
                    "resume the weights with a fresh optimizer"
                )
            try:
                wrapper.load_state_dict(checkpoint.pop("optimizer"))
            except (ValueError, KeyError) as err:
                raise CheckpointMismatchError(
                    f"the optimizer state in {filename!r} does not fit this optimizer: {err}"
                ) from err
        if resume_param_scheduler and hasattr(self, "param_schedulers"):
            self._load_scheduler_states(checkpoint.pop("param_schedulers", None), filename)

        self._restore_randomness(meta)
        self.epoch = int(meta.get("epoch", 0))
        self.step_in_epoch = int(meta.get("step_in_epoch", 0))
        if "iter" in meta:
            self.iter = int(meta["iter"])
        else:
            epoch_length = self.dispatch_kwargs.get("epoch_length")
            self.iter = self.epoch * epoch_length if epoch_length else 0
            self.logger.warning(
                "%s has no meta['iter']; resuming at iteration %d", filename, self.iter
            )
        grads = checkpoint.pop(ACCUMULATED_GRADS_KEY, None)
        if grads:
            params = dict(self.model.named_parameters())
            for name, grad in grads.items():
                if name in params:
                    params[name].grad = grad.to(params[name].device)
        if wrapper is not None and wrapper._accumulative_counts > 1:
            accumulation = meta.get("accumulation") or {}
            counts = accumulation.get("inner_count", self.iter)
            # A window the saved run's horizon closed early was stepped: nothing was lost.
            closed_by_horizon = counts == accumulation.get("max_counts")
            wrapper.initialize_count_status(
                self.model,
                counts,
                self._max_iters(wrapper._accumulative_counts),
                grads_restored=bool(grads) or closed_by_horizon,
            )
        self.logger.info("resumed from %s at epoch %d, iter %d", filename, self.epoch, self.iter)
        return checkpoint

    def _load_scheduler_states(self, states, filename: str) -> None:
        if states is None:
            raise CheckpointMismatchError(
                f"{filename!r} has no scheduler state; pass resume_param_scheduler=False to "
                "keep the freshly built schedulers"
            )
        if isinstance(states, dict):
            raise CheckpointMismatchError(
                f"{filename!r} holds schedulers of several optimizers ({sorted(states)}); "
                "this strategy has one optimizer"
            )
        if len(states) != len(self.param_schedulers):
            raise CheckpointMismatchError(
                f"{filename!r} holds {len(states)} scheduler states but "
                f"{len(self.param_schedulers)} schedulers are configured"
            )
        for scheduler, state in zip(self.param_schedulers, states, strict=True):
            scheduler.load_state_dict(state)

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


def _built_schedulers(cfg) -> list[_ParamScheduler]:
    items = cfg if isinstance(cfg, (list, tuple)) else [cfg]
    return [item for item in items if isinstance(item, _ParamScheduler)]
