"""``DDPStrategy``: mmengine's data-parallel strategy API, on torch's own engine.

One process per device, started by ``torchrun`` (or anything that sets its environment:
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); the model is
wrapped in torch's ``DistributedDataParallel``; checkpoints of the experiment are sharded
and written through ``torch.distributed.checkpoint`` by every rank
(:class:`~baton.checkpoint.writer.ShardedCheckpointWriter`), committed once by rank 0
after every part is durable.

Everything else is :class:`~baton.engine.strategy.SingleDeviceStrategy`'s: the same
checkpoint content (a sharded checkpoint loads as the dict a ``.pth`` holds, so either
kind resumes either strategy), the same position, randomness and accumulation handling.

Where it departs from mmengine's ``DDPStrategy`` (``docs/mmengine.md`` lists them):

* ``save_checkpoint`` into the experiment is called by every rank (mmengine: rank 0 only,
  writing one file) and writes a sharded checkpoint; a path or URI is written by rank 0
  as one ``.pth`` file, as mmengine does;
* the default wrapper is torch's ``DistributedDataParallel`` with its own defaults
  (``broadcast_buffers=True``: every rank holds rank 0's buffers, so a checkpoint holds
  the buffers of all), not mmcv's ``MMDistributedDataParallel`` with
  ``broadcast_buffers=False``; ``model_wrapper`` names another through the registry;
* ``dist_cfg``'s backend defaults to ``nccl`` with CUDA and ``gloo`` without (mmengine:
  ``nccl`` always);
* ``resume`` restores every rank's own RNG states (mmengine restores none).
"""

import copy
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from baton import build, randomness
from baton.checkpoint.writer import ShardedCheckpointWriter
from baton.engine.strategy import SingleDeviceStrategy
from baton.errors import ConfigError

# How long a collective waits for a rank before failing (a dead peer): torch's default is
# 30 minutes, during which a crashed run would hold its devices doing nothing.
DEFAULT_TIMEOUT_S = 300
_LAUNCHERS = ("pytorch",)
_SYNC_BN = (None, "torch")


def init_process_group(dist_cfg: dict | None = None) -> None:
    """Join the process group ``torchrun``'s environment describes (once per process).

    Args:
        dist_cfg: ``backend`` (default ``nccl`` with CUDA, else ``gloo``), ``timeout``
            (seconds), and other ``torch.distributed.init_process_group`` arguments.

    Raises:
        ValueError: The environment lacks what ``torchrun`` sets.
    """
    if dist.is_initialized():
        return
    missing = [
        k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ
    ]
    if missing:
        raise ValueError(
            f"DDPStrategy needs the environment torchrun sets ({', '.join(missing)} missing); "
            "start the script with torchrun --nproc-per-node N, or use SingleDeviceStrategy"
        )
    cfg = dict(dist_cfg or {})
    backend = cfg.pop("backend", "nccl" if torch.cuda.is_available() else "gloo")
    timeout = datetime.timedelta(seconds=float(cfg.pop("timeout", DEFAULT_TIMEOUT_S)))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend, timeout=timeout, **cfg)


class DDPStrategy(SingleDeviceStrategy):
    """Data-parallel training: one process per device, gradients averaged across them.

    Args:
        model_wrapper: ``{'type': ..., **kwargs}`` of the data-parallel wrapper (default:
            torch's ``DistributedDataParallel``); ``module`` and ``device_ids`` are filled in.
        sync_bn: ``'torch'`` turns every BatchNorm into a ``SyncBatchNorm``; ``None``
            leaves them (``'mmcv'`` needs mmcv's ops and is refused).
        **kwargs: :class:`SingleDeviceStrategy`'s; ``env_kwargs`` also takes
            ``launcher`` (``'pytorch'``: torchrun's environment) and ``dist_cfg``.

    Raises:
        ValueError: Another launcher or ``sync_bn``, or no torchrun environment.
    """

    def __init__(
        self,
        *,
        model_wrapper: dict | None = None,
        sync_bn: str | None = None,
        **kwargs,
    ):
        env = copy.deepcopy(kwargs.pop("env_kwargs", None) or {})
        launcher = env.pop("launcher", "pytorch")
        if launcher not in _LAUNCHERS:
            raise ValueError(
                f"launcher {launcher!r} is not supported; start the processes with torchrun "
                "and use launcher 'pytorch'"
            )
        if sync_bn not in _SYNC_BN:
            raise ValueError(
                f"sync_bn {sync_bn!r} is not supported; use 'torch' (torch's SyncBatchNorm) or None"
            )
        init_process_group(env.pop("dist_cfg", None))
        self.model_wrapper = copy.deepcopy(model_wrapper)
        self.sync_bn = sync_bn
        super().__init__(env_kwargs=env, **kwargs)
        # Checkpoint collectives get a gloo group of their own: a background save's thread
        # must never share a group with training's collectives (that hangs or breaks).
        self.checkpoint_group = dist.new_group(
            backend="gloo", timeout=datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
        )
        self._writer = ShardedCheckpointWriter(self.logger, process_group=self.checkpoint_group)

    # environment ----------------------------------------------------------------------

    @property
    def rank(self) -> int:
        """This process's rank."""
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        """The number of processes training together."""
        return dist.get_world_size()

    @property
    def distributed(self) -> bool:
        """Always True."""
        return True

    @property
    def launcher(self) -> str:
        """``'pytorch'``: processes started by torchrun."""
        return "pytorch"

    @property
    def local_rank(self) -> int:
        """This process's rank on its machine."""
        return int(os.environ.get("LOCAL_RANK", self.rank))

    @property
    def device(self) -> torch.device:
        """This rank's GPU (``LOCAL_RANK``) when there are GPUs, else the CPU."""
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def sum_across_ranks(self, values: list[float]) -> list[float]:
        """Element-wise sums of ``values`` over every rank (a collective: every rank calls
        it at the same point). Float64, so counts stay exact."""
        tensor = torch.tensor(values, dtype=torch.float64)
        if dist.get_backend() == "nccl":
            tensor = tensor.to(self.device)
        dist.all_reduce(tensor)
        return tensor.cpu().tolist()

    # model ----------------------------------------------------------------------------

    def convert_model(self, model: nn.Module) -> nn.Module:
        """With ``sync_bn='torch'``, every BatchNorm becomes a ``SyncBatchNorm`` (batch
        statistics over all ranks); otherwise the model is returned as it is."""
        if self.sync_bn == "torch":
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def _wrap_model(self, model: nn.Module) -> nn.Module:
        spec = dict(self.model_wrapper or {})
        wrapper_type = spec.pop("type", None)
        wrapper = (
            DistributedDataParallel
            if wrapper_type is None
            else build.resolve(wrapper_type, "model_wrapper")
        )
        if hasattr(model, "train_step") and not hasattr(wrapper, "train_step"):
            # Calling model.train_step past the wrapper would skip its gradient hooks:
            # every rank would train alone, silently.
            raise ConfigError(
                f"{type(model).__name__} trains itself with train_step, which "
                f"{wrapper.__name__} does not forward (its gradients would not be averaged "
                "across processes); give a model_wrapper with train_step (mmengine's "
                "MMDistributedDataParallel), or train the model on one process"
            )
        device_ids = [self.local_rank] if self.device.type == "cuda" else None
        return wrapper(model, device_ids=device_ids, **spec)

    @property
    def unwrapped_model(self) -> nn.Module:
        """The model inside the data-parallel wrapper."""
        return getattr(self.model, "module", self.model)

    # checkpoints ----------------------------------------------------------------------

    def _start_save(self, *args):
        """Every rank's RNG states go into the checkpoint (``meta['rng_ranks']``; rank 0's
        also as ``meta['rng']``, which a single-device resume restores): the dict every
        rank hands DCP must be the same on all."""
        self._share_buffers()
        checkpoint, target = super()._start_save(*args)
        ranks = self.rng_states_of_ranks()
        checkpoint["meta"]["rng"] = ranks[0]
        checkpoint["meta"]["rng_ranks"] = ranks
        return checkpoint, target

    def _share_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm's running statistics) before a save,
        as the wrapper's next forward would (``broadcast_buffers``): the dict every rank
        hands DCP must be the same on all, and a resume must continue with rank 0's. With
        ``broadcast_buffers=False`` each rank keeps its own, and a checkpoint holds one
        rank's: such a resume is not exact (docs/distributed.md)."""
        if not getattr(self.model, "broadcast_buffers", False):
            return
        for buffer in self.unwrapped_model.buffers():
            dist.broadcast(buffer.data, src=0)

    # randomness -----------------------------------------------------------------------

    def rng_states_of_ranks(self) -> list:
        """Every rank's RNG states, in rank order (a collective)."""
        states: list = [None] * self.world_size
        dist.all_gather_object(states, randomness.capture_rng_state())
        return states

    def _restore_randomness(self, meta: dict) -> None:
        super()._restore_randomness(meta)
        ranks = meta.get("rng_ranks")
        if isinstance(ranks, list) and len(ranks) == self.world_size:
            randomness.restore_rng_state(ranks[self.rank])
        elif isinstance(ranks, list):
            self.logger.warning(
                "the checkpoint was written by %d processes and this run has %d: each rank "
                "continues with rank 0's RNG states, so the run continues as an "
                "uninterrupted run would only within the tolerance docs/resume.md states",
                len(ranks),
                self.world_size,
            )
