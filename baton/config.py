"""Pipeline configs: YAML -> validated config -> built objects.

One YAML file declares a whole training run. :func:`load_config` parses it, applies
dotted-key overrides, and validates everything before any work starts: the structure
(pydantic models, unknown keys are errors at every level), every component's ``type``
(importable, inside the allowed modules) and its arguments (checked against the
signature, nothing built). All problems are reported at once in one
:class:`~baton.errors.ConfigError`, each with its dotted key path and YAML line.
This module holds the schema and those two entry points; the steps live beside it:
:mod:`baton.config_yaml` (bounded YAML with positions), :mod:`baton.config_overrides`
and :mod:`baton.config_checks`.

What happens when a resumed checkpoint's config and this one disagree is decided key by
key in :mod:`baton.resume_policy` (docs/resume.md): keys that are free to change (the
horizon, validation, logging, checkpointing) follow the config, so a finished run is
extended by raising ``max_epochs``; keys that change the run must match, or the run
forks on purpose (``fork: true``); the model never changes on resume.
"""

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from baton.checkpoint.store import RetentionPolicy
from baton.config_checks import (
    build_problems,
    check_checkpoint_location,
    compile_problems,
    component_problems,
    dedupe,
    pydantic_problems,
    quotas_for,
    semantic_problems,
)
from baton.config_overrides import RUN_SETTINGS, apply_overrides, parse_overrides, run_settings
from baton.config_yaml import (
    MAX_ALIASES,
    MAX_CONFIG_BYTES,
    MAX_EXPANDED_NODES,
    MAX_NESTING,
    MAX_OVERRIDES,
    MAX_STRING,
    ConfigProblem,
    Positions,
    check_depth,
    parse_yaml,
    summary,
)
from baton.errors import ConfigError
from baton.experiment.folder import check_experiment_name
from baton.trust.allowances import Trust, check_regular_file
from baton.trust.quotas import Quotas

# What ``from baton.config import ...`` offers: the schema and entry points defined here,
# and the names that moved to the modules above when this one was split.
__all__ = [
    "MAX_ALIASES",
    "MAX_CONFIG_BYTES",
    "MAX_EXPANDED_NODES",
    "MAX_NESTING",
    "MAX_OVERRIDES",
    "MAX_STRING",
    "RUN_SETTINGS",
    "AutoScaleLR",
    "CheckpointPolicy",
    "ClipGrad",
    "CompileConfig",
    "Component",
    "ConfigProblem",
    "DataConfig",
    "LoadFrom",
    "OptimWrapperConfig",
    "PipelineConfig",
    "Positions",
    "RandomnessConfig",
    "TrainConfig",
    "apply_overrides",
    "check_checkpoint_location",
    "load_config",
    "parse_overrides",
    "parse_yaml",
    "run_settings",
    "validate",
]


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
    resume: str = Field(
        "auto",
        min_length=1,
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


def validate(
    data: Mapping,
    positions: Positions | None = None,
    source: str = "<config>",
    *,
    trust: Trust | None = None,
    quotas: Quotas | None = None,
) -> PipelineConfig:
    """Validate a config mapping; every problem is reported at once.

    ``trust`` (default: :meth:`Trust.from_environment`) says which modules, schemes and
    folders the operator allows, ``quotas`` (default: :meth:`Quotas.from_environment`)
    how much a run may ask for; the config itself can widen neither.

    Raises:
        ConfigError: With ``problems`` listing each one (path, line, message).
    """
    positions = positions or {}
    trust = trust or Trust.from_environment()
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: a config must be a mapping, found {type(data).__name__}")
    data = dict(data)
    problems: list[ConfigProblem] = []
    config = None
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as err:
        problems += pydantic_problems(err, positions, PipelineConfig)
    found_in_components = component_problems(data, positions, trust)
    problems += found_in_components
    problems += compile_problems(data, positions, trust)
    if config is not None:
        quotas = quotas or quotas_for(config, trust)
        problems += semantic_problems(config, positions, trust, quotas)
        if not found_in_components:
            problems += build_problems(config, positions, trust, quotas)
    problems = dedupe(problems)
    if problems or config is None:
        raise ConfigError(summary(source, problems), problems)
    return config


def load_config(
    source: str | Path | Mapping,
    overrides: Mapping[str, Any] | Iterable[str] = (),
    *,
    trust: Trust | None = None,
    from_parameter: bool = False,
) -> PipelineConfig:
    """Load and validate a pipeline config from a YAML file, YAML text or a mapping.

    Args:
        source: A path to a YAML file, a mapping (an inline config from the UI), or
            YAML text (anything containing a newline or starting with ``{``).
        overrides: Dotted-key overrides (see :func:`apply_overrides`).
        trust: The operator's allowances (default: from the environment).
        from_parameter: ``source`` came from a run's parameters (the UI): a path must
            name a file in the project's ``configs/`` or an operator's config root.

    Raises:
        ConfigError: Anything wrong, all at once; nothing is created on disk.
    """
    trust = trust or Trust.from_environment()
    if isinstance(source, Mapping):
        try:
            text = json.dumps(source, default=str)
        except RecursionError as err:
            raise ConfigError(f"inline config nests deeper than {MAX_NESTING} levels") from err
        if len(text) > MAX_CONFIG_BYTES:
            raise ConfigError(f"inline config is larger than {MAX_CONFIG_BYTES} bytes")
        data, positions, name = json.loads(text), {}, "<inline config>"
        check_depth(data, name)
    elif not isinstance(source, (str, Path)):
        raise ConfigError(
            f"a config is a path to a YAML file, YAML text or a mapping; got a "
            f"{type(source).__name__}"
        )
    else:
        text_like = isinstance(source, str) and ("\n" in source or source.strip().startswith("{"))
        if text_like or Path(source).suffix not in (".yaml", ".yml"):
            text, name = str(source), "<config text>"
        else:
            path = trust.check_config_path(str(source)) if from_parameter else Path(source)
            text, name = _read_config_file(path), str(source)
        data, positions = parse_yaml(text, name)
    if overrides:
        data = apply_overrides(data, overrides)
    return validate(data, positions, name, trust=trust)


def _read_config_file(path: Path) -> str:
    if path.suffix not in (".yaml", ".yml"):
        raise ConfigError(
            f"config {str(path)!r} is not a .yaml file; name a YAML file, or pass YAML text"
        )
    try:
        check_regular_file(path, "config file", max_bytes=MAX_CONFIG_BYTES)
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text") from err
    except OSError as err:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {err.strerror}") from err
