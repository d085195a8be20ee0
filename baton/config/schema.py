"""The pipeline schema: every key of a pipeline config, its type, bounds and default.

One YAML file declares a whole training run; :class:`PipelineConfig` is its shape
(pydantic models, unknown keys are errors at every level, every default visible here).
Reading, overriding and checking a config happen beside it (:mod:`baton.config.loading`,
:mod:`baton.config.parsing`, :mod:`baton.config.overrides`, :mod:`baton.config.checks`),
which all build on this module, never the other way round.

What happens when a resumed checkpoint's config and this one disagree is decided key by
key in :mod:`baton.run.resume_policy` (docs/resume.md): keys that are free to change (the
horizon, validation, logging, checkpointing) follow the config, so a finished run is
extended by raising ``max_epochs``; keys that change the run must match, or the run
forks on purpose (``fork: true``); the model never changes on resume.
"""

import hashlib
import json
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    field_validator,
    model_validator,
)
from pydantic_core import CoreSchema, core_schema

from baton.checkpoint.store import RetentionPolicy
from baton.config.parsing import MAX_STRING
from baton.experiment.folder import check_experiment_name


class Resume(str):
    """Where a run continues from, the config's ``resume``: ``'auto'`` (the newest valid
    checkpoint of the newest lineage the config may continue), ``'never'`` (a new lineage),
    or anything else, a checkpoint it names. The one place that reads the value: the
    config checks ask :attr:`checkpoint` where it comes from, run control
    (:func:`baton.run.control.plan_resume`) which of the three it is.

    It is the string it was given (YAML, a flow parameter, ``--resume``; never empty), so
    the resolved config, its hash and every checkpoint's record of it are what they were.
    """

    AUTO = "auto"
    NEVER = "never"

    @property
    def auto(self) -> bool:
        """Continue from the newest checkpoint the config may continue."""
        return self == Resume.AUTO

    @property
    def never(self) -> bool:
        """Start a new lineage, resuming nothing."""
        return self == Resume.NEVER

    @property
    def checkpoint(self) -> str | None:
        """The checkpoint (a path or URI) to resume; ``None`` for auto and never."""
        return None if self.auto or self.never else str(self)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_after_validator_function(
            cls, core_schema.str_schema(min_length=1)
        )


def _has_type(value: dict) -> dict:
    if "type" not in value:
        raise ValueError("a component needs a 'type' key naming what to build")
    if not isinstance(value["type"], str) or not value["type"]:
        raise ValueError("'type' must be a non-empty string")
    return value


Component = Annotated[dict[str, Any], AfterValidator(_has_type)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_max_length=MAX_STRING)


class RandomnessConfig(_Strict):
    """Seeding. The data order, dropout and initialisation all follow the seed."""

    seed: int | None = Field(0, ge=0, le=2**31 - 1, description="None draws one and records it")
    deterministic: bool = Field(True, description="torch deterministic algorithms")
    diff_rank_seed: bool = False


class DataConfig(_Strict):
    """One split of the data and how it is batched."""

    dataset: Component = Field(description="dataset component, e.g. {type: DigitsDataset}")
    batch_size: int = Field(ge=1, le=1 << 16)
    shuffle: bool = True
    num_workers: int = Field(0, ge=0, le=64, description="worker processes reading samples")
    drop_last: bool = False
    pin_memory: bool | None = Field(
        None, description="page-locked batches; None: on when training on CUDA"
    )
    persistent_workers: bool = Field(True, description="keep workers from epoch to epoch")
    prefetch_factor: int | None = Field(
        None, ge=1, le=64, description="batches each worker reads ahead (None: torch's 2)"
    )


class ClipGrad(_Strict):
    """Gradient clipping, as mmengine's ``clip_grad``: by norm (``max_norm``) or by
    value (``type: value`` with ``clip_value``)."""

    type: Literal["norm", "value"] = "norm"
    max_norm: float | None = Field(None, gt=0)
    norm_type: float = Field(2.0, gt=0)
    clip_value: float | None = Field(None, gt=0)
    error_if_nonfinite: bool = False

    @model_validator(mode="after")
    def _fits_type(self) -> "ClipGrad":
        if self.type == "norm" and (self.max_norm is None or self.clip_value is not None):
            raise ValueError("norm clipping takes max_norm (and norm_type), not clip_value")
        if self.type == "value" and (self.clip_value is None or self.max_norm is not None):
            raise ValueError("value clipping (type: value) takes clip_value, not max_norm")
        return self

    def kwargs(self) -> dict[str, Any]:
        """The ``clip_grad`` dict the optimizer wrapper takes."""
        if self.type == "value":
            return {"type": "value", "clip_value": self.clip_value}
        return {
            "max_norm": self.max_norm,
            "norm_type": self.norm_type,
            "error_if_nonfinite": self.error_if_nonfinite,
        }


class OptimWrapperConfig(_Strict):
    """The optimizer and how it is stepped."""

    type: Literal["OptimWrapper", "AmpOptimWrapper"] = "OptimWrapper"
    optimizer: Component
    accumulative_counts: int = Field(1, ge=1, le=1024)
    clip_grad: ClipGrad | None = None


class CompileConfig(_Strict):
    """``torch.compile`` of one method of the model."""

    target: str = Field("forward", pattern=r"^[a-z][A-Za-z0-9_]{0,63}$")
    backend: Literal["inductor", "eager", "aot_eager", "cudagraphs"] = "inductor"
    mode: (
        Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None
    ) = None
    fullgraph: bool = False
    dynamic: bool | None = None


class LauncherConfig(_Strict):
    """How many processes train together (one per device; ``1``: this process alone)."""

    nproc: int = Field(
        1,
        ge=1,
        le=1024,
        description="training processes on this machine (one per GPU); the same config trains "
        "on 1 or N, and a checkpoint of one resumes on the other (docs/distributed.md)",
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="collective backend: 'auto' is nccl with CUDA, else gloo"
    )


class TrainConfig(_Strict):
    """The horizon: exactly one of ``max_epochs`` and ``max_iters``."""

    max_epochs: int | None = Field(None, ge=1, le=100_000)
    max_iters: int | None = Field(None, ge=1, le=1_000_000_000)
    val_interval: int = Field(1, ge=1, description="validate every this many epochs")
    log_interval: int = Field(50, ge=1, description="a metrics.jsonl record every N iterations")


class CheckpointPolicy(_Strict):
    """When checkpoints are written and which survive.

    The survival fields are the experiment's retention policy (:meth:`retention`); a
    pipeline keeps the last 3 by default, where the strategy alone keeps every file as
    mmengine's does.
    """

    interval: int = Field(1, ge=1, description="save every this many epochs")
    interval_iters: int | None = Field(None, ge=1, description="also save every N iterations")
    keep_last: int | None = Field(3, ge=1, description="None keeps every checkpoint")
    keep_best: int = Field(0, ge=0)
    best_metric: str | None = Field(None, description="e.g. val/accuracy")
    best_mode: Literal["max", "min"] = "max"
    save_optimizer: bool = True
    async_save: bool = Field(
        False, description="write in the background; training waits for a snapshot only"
    )

    def retention(self) -> RetentionPolicy:
        """What rotation keeps of each lineage."""
        return RetentionPolicy(
            keep_last=self.keep_last,
            keep_best=self.keep_best,
            best_metric=self.best_metric,
            best_mode=self.best_mode,
        )


class LoadFrom(_Strict):
    """Weights to start from (not a resume: optimizer and position start fresh)."""

    uri: str
    revise_keys: list[tuple[str, str]] = [(r"^module\.", "")]
    strict: bool = False


class AutoScaleLR(_Strict):
    """Scale learning rates by ``batch_size / base_batch_size``."""

    enable: bool = False
    base_batch_size: int = Field(ge=1)


class PipelineConfig(_Strict):
    """A whole training pipeline. Every default is visible here."""

    experiment_name: str = Field(description="stable name of the experiment folder")
    work_dir: str = Field(
        "work_dirs",
        min_length=1,
        description="folder of all experiments, relative to the project (absolute only "
        "under an operator's work-dir root)",
    )
    randomness: RandomnessConfig = RandomnessConfig()
    model: Component
    loss: Component = {"type": "CrossEntropyLoss"}
    train_data: DataConfig
    val_data: DataConfig | None = None
    optim_wrapper: OptimWrapperConfig
    param_scheduler: list[Component] = Field(default_factory=list)
    train: TrainConfig
    checkpoint: CheckpointPolicy = CheckpointPolicy()
    resume: Resume = Field(
        Resume(Resume.AUTO),
        description="'auto' (newest valid), 'never', or a checkpoint in the experiment "
        "folder or an operator's checkpoint root",
    )
    fork: bool = Field(
        False,
        description="resume even if keys that change the run differ from the checkpoint's: "
        "continue from it with the new values, recorded as a fork (docs/resume.md)",
    )
    load_from: LoadFrom | None = None
    compile: bool | CompileConfig = False
    auto_scale_lr: AutoScaleLR | None = None
    launcher: LauncherConfig = LauncherConfig()
    amp: bool = Field(False, description="mixed precision (AmpOptimWrapper)")

    @field_validator("experiment_name")
    @classmethod
    def _name_is_safe(cls, value: str) -> str:
        return check_experiment_name(value)

    def to_yaml(self) -> str:
        """The fully resolved config as YAML (defaults included)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @property
    def config_hash(self) -> str:
        """sha256 of the resolved config (canonical JSON)."""
        return _digest(self.model_dump(mode="json"))

    @property
    def architecture_hash(self) -> str:
        """sha256 of the ``model`` section: what must match to resume a checkpoint."""
        return _digest(self.model_dump(mode="json")["model"])


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
