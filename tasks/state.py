"""What travels between tasks (``RunState``) and the live pipeline each flow process keeps.

Between tasks only small values travel: the resolved config (a dict) and a ``RunState``
(position, horizon, last committed ``CheckpointRef``, latest metrics). The model itself
stays in this process: :func:`live_pipeline` hands the next task the pipeline the
previous task left, if it is clean and at the position the ``RunState`` says. Otherwise
(a fresh process, or a retry after a task failed half way through an epoch) it rebuilds
the pipeline from the state's checkpoint and replays the iterations since then, which is
exact because data order and RNG states are part of the checkpoint.

The live pipeline's data loaders keep their worker processes between tasks, so the
workers start once per flow run; a rebuild or :func:`forget` stops them.
"""

import contextlib
import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from baton.checkpoint import io
from baton.checkpoint.ref import CheckpointRef
from baton.config import PipelineConfig, validate
from baton.errors import CheckpointError
from baton.experiment import Experiment
from baton.run import pipeline as pl
from baton.tasks._common import run_logger
from baton.trust import Trust


class RunState(BaseModel):
    """Where a training run stands. Small, frozen, JSON-serialisable."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    experiment_name: str
    checkpoint: CheckpointRef | None = Field(None, description="last committed checkpoint")
    epoch: int = Field(0, ge=0, description="completed epochs")
    iter: int = Field(0, ge=0, description="completed iterations")
    max_epochs: int = Field(ge=1)
    max_iters: int = Field(ge=1)
    epoch_length: int = Field(ge=1)
    metrics: dict[str, float] = Field(default_factory=dict, description="of the last epoch")

    @property
    def finished(self) -> bool:
        """True once the horizon is reached."""
        return self.iter >= self.max_iters

    @property
    def step_in_epoch(self) -> int:
        """Iterations done in the current, unfinished epoch."""
        return self.iter - self.epoch * self.epoch_length

    @classmethod
    def of(cls, pipeline: pl.Pipeline, checkpoint: CheckpointRef | None) -> "RunState":
        """The state of a freshly built (or resumed) pipeline."""
        strategy = pipeline.strategy
        return cls(
            experiment_name=pipeline.config.experiment_name,
            checkpoint=checkpoint,
            epoch=strategy.epoch,
            iter=strategy.iter,
            max_epochs=pipeline.max_epochs,
            max_iters=pipeline.max_iters,
            epoch_length=pipeline.epoch_length,
            metrics=dict(checkpoint.metrics) if checkpoint else {},
        )

    def at(self, pipeline: pl.Pipeline, **changes) -> "RunState":
        """This state moved to the pipeline's current position."""
        strategy = pipeline.strategy
        return self.model_copy(update={"epoch": strategy.epoch, "iter": strategy.iter, **changes})


# Configs validated in this process, by the digest of their JSON and the operator's trust
# settings: every task of a flow run receives the same resolved dict, validated once here
# instead of once per task; a different dict, or other trust settings, validate anew.
_VALIDATED: dict[str, PipelineConfig] = {}
_VALIDATED_MAX = 16


def config_of(config: dict | PipelineConfig) -> PipelineConfig:
    """The validated config a task received as a dict."""
    if isinstance(config, PipelineConfig):
        return config
    trust = Trust.from_environment()
    try:
        text = json.dumps([config, repr(trust)], sort_keys=True)
    except (TypeError, ValueError):  # not what validate-config returns: no cache
        return validate(config, trust=trust)
    key = hashlib.sha256(text.encode()).hexdigest()
    with _LOCK:
        known = _VALIDATED.get(key)
    if known is not None:
        return known
    validated = validate(config, trust=trust)
    with _LOCK:
        if len(_VALIDATED) >= _VALIDATED_MAX:
            _VALIDATED.pop(next(iter(_VALIDATED)))
        _VALIDATED[key] = validated
    return validated


@dataclass
class _Live:
    pipeline: pl.Pipeline
    config_hash: str
    clean: bool = True


_LIVE: dict[str, _Live] = {}
_LOCK = threading.Lock()


_KEYS: dict[int, tuple[PipelineConfig, str]] = {}
_KEYS_LOCK = threading.Lock()  # _key is called with _LOCK held


def _key(cfg: PipelineConfig, *, check: bool = False) -> str:
    """The live pipeline's key: its experiment's folder, as resolved by the last check of
    the path against the operator's roots. With ``check`` (once per task, where it takes
    the live pipeline) the path is checked and resolved again: a folder swapped for a link
    elsewhere between two tasks is refused."""
    known = _KEYS.get(id(cfg))
    if not check and known is not None and known[0] is cfg:
        return known[1]
    key = str(Experiment.of(cfg).root)
    with _KEYS_LOCK:
        if len(_KEYS) >= _VALIDATED_MAX:
            _KEYS.pop(next(iter(_KEYS)))
        _KEYS[id(cfg)] = (cfg, key)
    return key


def _matches(live: _Live, cfg: PipelineConfig, state: RunState) -> bool:
    strategy = live.pipeline.strategy
    return (
        live.clean
        and live.config_hash == cfg.config_hash
        and (strategy.epoch, strategy.iter) == (state.epoch, state.iter)
    )


def _resumable_in_epoch(cfg: PipelineConfig, state: RunState) -> CheckpointRef | None:
    """The run's newest valid checkpoint inside the epoch after ``state`` (its iteration
    checkpoints), if it wrote one with this config: a retried epoch continues from there
    instead of training and committing those iterations again (retention may already have
    deleted ``state.checkpoint`` for them)."""
    store = Experiment.of(cfg).store
    head = store.head()
    if head is None:
        return None
    end = (state.epoch + 1) * state.epoch_length
    for ref in reversed(head.checkpoints):
        if ref.epoch != state.epoch or not state.iter < ref.iter < end:
            continue
        if not store.is_valid(ref):
            continue
        try:
            written_by = io.load_meta(ref.uri).get("config_hash")
        except (CheckpointError, OSError):
            continue
        if written_by == cfg.config_hash:  # not another run's (a fork's source line)
            return ref
    return None


def live_pipeline(
    cfg: PipelineConfig,
    state: RunState | None,
    *,
    checkpoint: CheckpointRef | None = None,
    within_epoch: bool = False,
) -> tuple[pl.Pipeline, bool]:
    """The pipeline at ``state``'s position: the live one if clean, else rebuilt.

    Without a state, a new pipeline is built from ``checkpoint`` (or from scratch). With
    ``within_epoch`` (a task that trains the epoch after ``state``), a rebuilt pipeline may
    stand further inside that epoch, at the run's newest iteration checkpoint there.

    Returns:
        ``(pipeline, reused)``.
    """
    if state is not None:
        checkpoint = state.checkpoint
        key = _key(cfg, check=True)
        with _LOCK:
            live = _LIVE.get(key)
            if live is not None and _matches(live, cfg, state):
                return live.pipeline, True
    with _LOCK:
        stale = _LIVE.pop(_key(cfg), None)
    if stale is not None:
        _stop_workers(stale.pipeline)  # a failed epoch's workers may be dead or mid-batch
    inside = _resumable_in_epoch(cfg, state) if state is not None and within_epoch else None
    if state is None or inside is not None:
        pipeline = pl.restore(cfg, inside or checkpoint, own_process=True)
    else:
        evaluated = any(key.startswith("val/") for key in state.metrics)
        pipeline = pl.restore(
            cfg, checkpoint, to_iter=state.iter, evaluated=evaluated, own_process=True
        )
    run_logger().info("training in %s", pipeline.trains_in)
    with _LOCK:
        _LIVE[_key(cfg)] = _Live(pipeline, cfg.config_hash)
    return pipeline, False


@contextlib.contextmanager
def using(cfg: PipelineConfig, pipeline: pl.Pipeline) -> Iterator[None]:
    """Mark the live pipeline dirty while a task changes it; clean again on success."""
    live = _LIVE.get(_key(cfg))
    if live is None or live.pipeline is not pipeline:
        live = _LIVE[_key(cfg)] = _Live(pipeline, cfg.config_hash)
    live.clean = False
    yield
    live.clean = True


@contextlib.contextmanager
def live_step(
    config: dict | PipelineConfig, state: RunState, *, within_epoch: bool = False
) -> Iterator[pl.Pipeline]:
    """The live pipeline at ``state``'s position (rebuilt if need be; see
    :func:`live_pipeline` for ``within_epoch``), held for one step: what every task that
    changes the pipeline does first."""
    cfg = config_of(config)
    pipeline, reused = live_pipeline(cfg, state, within_epoch=within_epoch)
    if not reused:
        origin = state.checkpoint.uri if state.checkpoint else "scratch"
        if pipeline.strategy.iter != state.iter:
            origin = f"iteration {pipeline.strategy.iter} of epoch {state.epoch + 1}"
        run_logger().info("rebuilt the pipeline from %s", origin)
    with using(cfg, pipeline):
        yield pipeline


def forget(cfg: PipelineConfig) -> None:
    """Drop the live pipeline of an experiment and stop its loader workers (at the end of
    a flow run)."""
    with _LOCK:
        live = _LIVE.pop(_key(cfg), None)
    if live is not None:
        _stop_workers(live.pipeline)


def _stop_workers(pipeline: pl.Pipeline | pl.RankedPipeline) -> None:
    pipeline.close()  # its loader workers; on several processes, the ranks
