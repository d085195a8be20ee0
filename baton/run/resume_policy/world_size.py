"""The number of processes, between a checkpoint and the run that resumes it.

A run's *global batch* (the samples of one iteration, over all its processes) decides its
epoch length, its schedules in iterations and what ``auto_scale_lr`` scaled. A fresh run
takes ``train_data.batch_size`` per process, as mmengine does: ``batch_size * nproc``.

A resume at another number of processes continues the same run: it keeps the global
batch the checkpoint recorded (``meta['global_batch_size']``) and splits it across its own
processes (the loader gives rank ``r`` the samples ``r, r + nproc, ...`` of each batch,
each weighted by its share). The epochs hold the same samples in the same order with the
same augmentation, the schedules stay where they were; only the order in which gradients
are summed changes, so the run matches an uninterrupted one within floating-point
tolerance, not bit for bit (docs/resume.md gives the figures).

With ``fork: true`` the configured global batch applies instead (a new epoch length,
recorded as the fork it is).
"""

import logging

from baton.config.schema import PipelineConfig

logger = logging.getLogger(__name__)

# ``meta`` key of the global batch a checkpoint trained with.
GLOBAL_BATCH_KEY = "global_batch_size"


def configured_global_batch(cfg: PipelineConfig, world_size: int) -> int:
    """A fresh run's global batch: ``train_data.batch_size`` per process."""
    return cfg.train_data.batch_size * world_size


def saved_global_batch(meta: dict) -> int | None:
    """The global batch a checkpoint trained with: recorded since baton trains on several
    processes; before, one process trained on its config's ``batch_size``."""
    recorded = meta.get(GLOBAL_BATCH_KEY)
    if isinstance(recorded, int) and recorded > 0:
        return recorded
    batch = ((meta.get("config") or {}).get("train_data") or {}).get("batch_size")
    return batch if isinstance(batch, int) and batch > 0 else None


def global_batch(cfg: PipelineConfig, world_size: int, meta: dict | None) -> int:
    """The global batch of a run of ``cfg`` on ``world_size`` processes that resumes a
    checkpoint with ``meta`` (``None``: a fresh start)."""
    configured = configured_global_batch(cfg, world_size)
    saved = saved_global_batch(meta) if meta is not None else None
    if saved is None or saved == configured or cfg.fork:
        return configured
    saved_processes = meta.get("world_size", 1)
    logger.warning(
        "the checkpoint trained on global batches of %d samples (%s process%s); this run "
        "keeps them on %d process%s (about %d samples each) so that it continues the same "
        "run; to train on batch_size x nproc = %d instead, fork (baton run --fork)",
        saved,
        saved_processes,
        "" if saved_processes == 1 else "es",
        world_size,
        "" if world_size == 1 else "es",
        -(-saved // world_size),
        configured,
    )
    return saved
