"""Pipeline configs: YAML -> validated config -> built objects.

One YAML file declares a whole training run. :func:`load_config` parses it, applies
dotted-key overrides, and validates everything before any work starts: the structure
(pydantic models, unknown keys are errors at every level), every component's ``type``
(importable, inside the allowed modules) and its arguments (checked against the
signature, nothing built). All problems are reported at once in one
:class:`~baton.errors.ConfigError`, each with its dotted key path and YAML line.

What happens when a resumed checkpoint's config and this one disagree is decided key by
key in :mod:`baton.resume_policy` (docs/resume.md): keys that are free to change (the
horizon, validation, logging, checkpointing) follow the config, so a finished run is
extended by raising ``max_epochs``; keys that change the run must match, or the run
forks on purpose (``fork: true``); the model never changes on resume.
"""

import difflib
import hashlib
import json
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
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

from baton import build
from baton.checkpoint.store import RetentionPolicy
from baton.errors import ConfigError, MissingInputError, UntrustedInputError
from baton.experiment import check_experiment_name
from baton.schedulers import SCHEDULERS
from baton.trust import SETTINGS, Trust, check_regular_file, where_to_set

# Limits on what a config file may be; configs also arrive from a web form.
MAX_CONFIG_BYTES = 1 << 20
MAX_NESTING = 32
MAX_STRING = 4096
# YAML aliases share a node; expanding them can multiply a tiny text into gigabytes
# (a "billion laughs"). Both the number of aliases and the expanded size are bounded.
MAX_ALIASES = 64
MAX_EXPANDED_NODES = 100_000
MAX_OVERRIDES = 256


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

    @model_validator(mode="after")
    def _retention_is_valid(self) -> "CheckpointPolicy":
        self.retention()  # keep_best without best_metric is refused here, before any run
        return self

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


# --- YAML with positions -------------------------------------------------------------


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a config."""

    path: str
    message: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        where = f" (line {self.line}, column {self.column})" if self.line else ""
        return f"{self.path or '<top level>'}{where}: {self.message}"


Positions = dict[tuple, tuple[int, int]]


def _positions(node: yaml.Node, path: tuple, out: Positions, problems: list, depth: int) -> None:
    if depth > MAX_NESTING:
        raise ConfigError(
            f"config nests deeper than {MAX_NESTING} levels at {_dotted(path)}",
            [ConfigProblem(_dotted(path), f"nested deeper than {MAX_NESTING} levels")],
        )
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        for key_node, value_node in node.value:
            key = key_node.value
            child = (*path, key)
            mark = key_node.start_mark
            if key in seen:
                problems.append(
                    ConfigProblem(
                        _dotted(child),
                        "duplicate key (the later one would silently win)",
                        mark.line + 1,
                        mark.column + 1,
                    )
                )
            seen.add(key)
            out[child] = (mark.line + 1, mark.column + 1)
            _positions(value_node, child, out, problems, depth + 1)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*path, index)
            out[child] = (item.start_mark.line + 1, item.start_mark.column + 1)
            _positions(item, child, out, problems, depth + 1)


def _dotted(path: Iterable) -> str:
    return ".".join(str(p) for p in path)


def _locate(path: tuple, positions: Positions) -> tuple[int | None, int | None]:
    for end in range(len(path), -1, -1):
        if path[:end] in positions:
            return positions[path[:end]]
    return None, None


def _load_bounded(text: str, source: str) -> tuple[yaml.Node | None, Any]:
    """Compose and construct one YAML document, refusing alias expansion bombs.

    Aliases are counted in the event stream (linear in the text) and the size of the
    document once every alias is expanded is computed over the shared node graph, so a
    hostile text is refused before anything walks the expanded tree.
    """
    aliases = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            aliases += 1
            if aliases > MAX_ALIASES:
                raise ConfigError(
                    f"{source}: more than {MAX_ALIASES} YAML aliases (*name); write the values out"
                )
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _expanded_size(node, {}, set(), source)
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return node, data


def _expanded_size(node: yaml.Node, sizes: dict[int, int], active: set[int], source: str) -> int:
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in active:
        raise ConfigError(f"{source}: a YAML alias refers to itself (a recursive document)")
    active.add(key)
    total = 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            total += _expanded_size(key_node, sizes, active, source)
            total += _expanded_size(value_node, sizes, active, source)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            total += _expanded_size(item, sizes, active, source)
    active.discard(key)
    if total > MAX_EXPANDED_NODES:
        raise ConfigError(
            f"{source}: the config expands to more than {MAX_EXPANDED_NODES} values "
            "(YAML aliases); write it out plainly"
        )
    sizes[key] = total
    return total


def parse_yaml(text: str, source: str = "<config>") -> tuple[dict, Positions]:
    """Parse YAML text into a mapping and the line/column of every key.

    Raises:
        ConfigError: Syntax errors (with their line), a document that is not a mapping,
            duplicate keys, or a document too large or too deep.
    """
    if len(text.encode("utf-8", errors="replace")) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: config is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        node, data = _load_bounded(text, source)
    except ConfigError:
        raise
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
        problem = ConfigProblem("", f"YAML syntax error: {err.problem or err}", line, column)
        raise ConfigError(f"{source}: {problem}", [problem]) from err
    except (yaml.YAMLError, RecursionError, ValueError) as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: a config must be a mapping of keys to values, found a {type(data).__name__}"
        )
    positions: Positions = {}
    problems: list[ConfigProblem] = []
    if node is not None:
        _positions(node, (), positions, problems, 0)
    if problems:
        raise ConfigError(_summary(source, problems), problems)
    return data, positions


# --- overrides -----------------------------------------------------------------------


# The run's settings that are parameters of their own (flow parameters, CLI flags).
RUN_SETTINGS = ("experiment_name", "resume", "work_dir", "fork")


def run_settings(overrides: Iterable[str] | None = None, **named: Any) -> dict[str, Any]:
    """The overrides a run applies to its config: ``key.path=value`` strings, then the
    run's own settings (:data:`RUN_SETTINGS`) where they are given (not ``None``).

    Raises:
        ConfigError: A malformed override, or a named setting that is not a run setting.
    """
    unknown = sorted(set(named) - set(RUN_SETTINGS))
    if unknown:
        raise ConfigError(f"unknown run settings {unknown}; use {', '.join(RUN_SETTINGS)}")
    settings = parse_overrides(overrides or [])
    settings.update({key: value for key, value in named.items() if value is not None})
    return settings


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``key.path=value`` strings; values are read as YAML (typed).

    Raises:
        ConfigError: An item without ``=`` or with a value that is not valid YAML.
    """
    parsed: dict[str, Any] = {}
    for count, item in enumerate(items, 1):
        if count > MAX_OVERRIDES:
            raise ConfigError(f"more than {MAX_OVERRIDES} overrides; put them in a config file")
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {_short(item)} must look like key.path=value")
        if len(item) > MAX_STRING:
            raise ConfigError(f"override {_short(item)} is longer than {MAX_STRING} characters")
        key, _, raw = item.partition("=")
        try:
            parsed[key.strip()] = (
                _load_bounded(raw, f"override {key.strip()!r}")[1] if raw.strip() else ""
            )
        except yaml.YAMLError as err:
            raise ConfigError(f"override {_short(item)}: value is not valid YAML") from err
    return parsed


def apply_overrides(data: dict, overrides: Mapping[str, Any] | Iterable[str]) -> dict:
    """Return a copy of ``data`` with dotted-key overrides applied.

    ``overrides`` is a mapping (``{'train.max_epochs': 5}``) or ``key=value`` strings
    (``'optim_wrapper.optimizer.lr=0.01'``, see :func:`parse_overrides`). Integers index
    into lists (``param_scheduler.0.end=3``). Values are checked by the schema afterwards.

    Raises:
        ConfigError: A malformed override or a path through a non-container.
    """
    result = json.loads(json.dumps(data, default=str))
    pairs = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
    for key, value in pairs.items():
        parts = str(key).split(".")
        if not key or any(not p for p in parts):
            raise ConfigError(f"override key {key!r} is empty or has an empty part")
        target: Any = result
        for depth, part in enumerate(parts[:-1]):
            target = _step_into(target, part, parts[: depth + 1], create=True)
        last = parts[-1]
        if isinstance(target, list):
            index = _index(last, target, parts)
            target[index] = value
        elif isinstance(target, dict):
            target[last] = value
        else:
            raise ConfigError(f"override {key!r}: {'.'.join(parts[:-1])} is not a mapping")
    return result


def _index(part: str, target: list, parts: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(target):
        raise ConfigError(
            f"override {'.'.join(parts)!r}: {part!r} is not an index of a list of {len(target)}"
        )
    return int(part)


def _step_into(target: Any, part: str, parts: list[str], *, create: bool) -> Any:
    if isinstance(target, list):
        return target[_index(part, target, parts)]
    if isinstance(target, dict):
        if part not in target or target[part] is None:
            if not create:
                raise ConfigError(f"override {'.'.join(parts)!r}: no such key")
            target[part] = {}
        return target[part]
    raise ConfigError(f"override {'.'.join(parts)!r}: {'.'.join(parts[:-1])} is not a mapping")


# --- validation ----------------------------------------------------------------------


def _fields_at(model: type[BaseModel], path: tuple) -> list[str] | None:
    """Allowed keys of the model that validates ``path`` (for 'unknown key' hints)."""
    current: Any = model
    for part in path:
        current = _unwrap(current)
        if isinstance(part, int):
            args = typing.get_args(current)
            current = args[0] if args else None
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        current = field.annotation
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def _unwrap(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        models = [a for a in options if isinstance(a, type) and issubclass(a, BaseModel)]
        return models[0] if models else (options[0] if len(options) == 1 else annotation)
    return annotation


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _pydantic_problems(err: ValidationError, positions: Positions) -> list[ConfigProblem]:
    problems = []
    items = [(_without_union_tags(item["loc"]), item) for item in err.errors()]
    deeper = {loc[:-1] for loc, _ in items if loc}
    for loc, item in items:
        # A union (``bool | CompileConfig``) reports one error per option; a mapping
        # given where a scalar option failed is about the other option's keys.
        if item["type"].endswith("_type") and loc in deeper:
            continue
        line, column = _locate(loc, positions)
        if item["type"] == "extra_forbidden" and loc and loc[-1] in SETTINGS:
            message = (
                f"{loc[-1]} is not a config key: what a run may reach is the operator's "
                f"decision, not the config's; {where_to_set(str(loc[-1]))}"
            )
        elif item["type"] == "extra_forbidden":
            allowed = _fields_at(PipelineConfig, loc[:-1]) or []
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            message = "unknown key"
            if hint:
                message += f"; did you mean {hint[0]!r}?"
            if allowed:
                message += f" Allowed here: {', '.join(allowed)}"
        elif item["type"] == "missing":
            message = "required key is missing"
        else:
            message = f"{item['msg']}; found {_short(item.get('input'))}"
        problems.append(ConfigProblem(_dotted(loc), message, line, column))
    return _dedupe(problems)


def _without_union_tags(loc: tuple) -> tuple:
    """The key path without the tags pydantic adds for union options and validators
    (``function-after[...]``, ``union[...]``, ``bool``, ``CompileConfig``)."""
    models = {cls.__name__ for cls in _Strict.__subclasses__()}
    kept = tuple(
        p
        for p in loc
        if not isinstance(p, str)
        or not (p.startswith(("function-", "union[")) or p in models or p in _TYPE_TAGS)
    )
    return kept if kept or not loc else tuple(loc)


_TYPE_TAGS = {"bool", "int", "float", "str", "list", "dict", "tuple", "none", "literal"}


def _dedupe(problems: list[ConfigProblem]) -> list[ConfigProblem]:
    seen, out = set(), []
    for problem in problems:
        key = (problem.path, problem.message)
        if key not in seen:
            seen.add(key)
            out.append(problem)
    return out


# Where the pipeline holds components, and the kind each slot takes.
def _slots(data: Mapping) -> list[tuple[tuple, Any, str]]:
    found: list[tuple[tuple, Any, str]] = [
        (("model",), data.get("model"), "model"),
        (("loss",), data.get("loss", {"type": "CrossEntropyLoss"}), "loss"),
    ]
    for key in ("train_data", "val_data"):
        section = data.get(key)
        if isinstance(section, Mapping):
            found.append(((key, "dataset"), section.get("dataset"), "dataset"))
    wrapper = data.get("optim_wrapper")
    if isinstance(wrapper, Mapping):
        found.append((("optim_wrapper", "optimizer"), wrapper.get("optimizer"), "optimizer"))
    schedulers = data.get("param_scheduler")
    if isinstance(schedulers, list):
        for index, item in enumerate(schedulers):
            found.append((("param_scheduler", index), item, "scheduler"))
    return found


def _component_problems(data: Mapping, positions: Positions, trust: Trust) -> list[ConfigProblem]:
    """Check every component's ``type`` (kind and trust) and arguments, building nothing."""
    problems = []
    for path, cfg, kind in _slots(data):
        if isinstance(cfg, Mapping) and isinstance(cfg.get("type"), str) and cfg["type"]:
            for where, message in build.check(cfg, kind, trust=trust, path=path):
                problems.append(ConfigProblem(_dotted(where), message, *_locate(where, positions)))
    return problems


def _build_problems(
    cfg: "PipelineConfig", positions: Positions, trust: Trust
) -> list[ConfigProblem]:
    """Build model, loss and optimizer on the meta device: no memory, no data, but every
    constructor runs, so a negative size or a bad learning rate is found now."""
    problems = []

    def add(path: tuple, err: Exception) -> None:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        problems.append(
            ConfigProblem(_dotted(path), f"cannot be built: {text}", *_locate(path, positions))
        )

    with torch.device("meta"):
        try:
            model = build.build(cfg.model, "model", trust=trust)
        except Exception as err:
            add(("model",), err)
            model = None
        try:
            build.build(cfg.loss, "loss", trust=trust)
        except Exception as err:
            add(("loss",), err)
        if model is not None:
            try:
                build.build(
                    cfg.optim_wrapper.optimizer, "optimizer", trust=trust, params=model.parameters()
                )
            except Exception as err:
                add(("optim_wrapper", "optimizer"), err)
    return problems


def _semantic_problems(
    cfg: "PipelineConfig", positions: Positions, trust: Trust
) -> list[ConfigProblem]:
    problems = []

    def add(path: tuple, message: str) -> None:
        problems.append(ConfigProblem(_dotted(path), message, *_locate(path, positions)))

    if (cfg.train.max_epochs is None) == (cfg.train.max_iters is None):
        add(("train",), "give exactly one of max_epochs and max_iters")
    policy = cfg.checkpoint
    if policy.keep_best and not policy.best_metric:
        add(("checkpoint", "keep_best"), "keep_best needs best_metric (e.g. val/accuracy)")
    if policy.best_metric and not policy.best_metric.startswith(("val/", "train/")):
        add(("checkpoint", "best_metric"), "best_metric must start with 'val/' or 'train/'")
    if policy.best_metric and policy.best_metric.startswith("val/") and cfg.val_data is None:
        add(("checkpoint", "best_metric"), f"{policy.best_metric} needs val_data")
    for index, item in enumerate(cfg.param_scheduler):
        cls = SCHEDULERS.get(item.get("type"))
        if not getattr(cls, "need_val_args", False):
            continue
        # A plateau scheduler follows the validations: without them it would never act.
        if cfg.val_data is None:
            add(("param_scheduler", index, "type"), f"{item['type']} needs val_data")
        iteration_based = {"by_epoch": False, "convert_to_iter_based": True}
        for key, value in iteration_based.items():
            if item.get(key) is value:
                add(
                    ("param_scheduler", index, key),
                    f"{item['type']} steps after validations, once per epoch: remove {key}",
                )
    experiment_dir = None
    try:
        experiment_dir = trust.check_work_dir(cfg.work_dir) / cfg.experiment_name
    except UntrustedInputError as err:
        add(("work_dir",), str(err))
    uris = []
    if cfg.resume not in ("auto", "never"):
        uris.append((("resume",), cfg.resume, "resume checkpoint"))
    if cfg.load_from is not None:
        uris.append((("load_from", "uri"), cfg.load_from.uri, "load_from"))
    for path, uri, what in uris:
        try:
            check_checkpoint_location(trust, uri, experiment_dir, what)
        except UntrustedInputError as err:
            add(path, str(err))
    return problems


def check_checkpoint_location(
    trust: Trust, uri: str, experiment_dir: Path | None, what: str
) -> str:
    """Where a checkpoint named by a config may come from (see ``Trust.check_checkpoint``);
    a missing file is left for the run to report, so a config can name a checkpoint that
    a run will write."""
    try:
        return trust.check_checkpoint(uri, experiment_dir=experiment_dir, what=what)
    except MissingInputError:
        return str(trust.resolve(uri))


def _summary(source: str, problems: list[ConfigProblem]) -> str:
    count = len(problems)
    lines = [f"{source}: {count} problem{'s' if count != 1 else ''} in the config:"]
    lines += [f"  - {p}" for p in problems]
    return "\n".join(lines)


def validate(
    data: Mapping,
    positions: Positions | None = None,
    source: str = "<config>",
    *,
    trust: Trust | None = None,
) -> PipelineConfig:
    """Validate a config mapping; every problem is reported at once.

    ``trust`` (default: :meth:`Trust.from_environment`) says which modules, schemes and
    folders the operator allows; the config itself cannot widen it.

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
        problems += _pydantic_problems(err, positions)
    component_problems = _component_problems(data, positions, trust)
    problems += component_problems
    if config is not None:
        problems += _semantic_problems(config, positions, trust)
        if not component_problems:
            problems += _build_problems(config, positions, trust)
    problems = _dedupe(problems)
    if problems or config is None:
        raise ConfigError(_summary(source, problems), problems)
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
        text = json.dumps(source, default=str)
        if len(text) > MAX_CONFIG_BYTES:
            raise ConfigError(f"inline config is larger than {MAX_CONFIG_BYTES} bytes")
        data, positions, name = json.loads(text), {}, "<inline config>"
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
