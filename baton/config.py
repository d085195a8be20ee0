"""Pipeline configs: YAML -> validated config -> built objects.

One YAML file declares a whole training run. :func:`load_config` parses it, applies
dotted-key overrides, and validates everything before any work starts: the structure
(pydantic models, unknown keys are errors at every level), every component's ``type``
(importable, inside the allowed modules) and its arguments (checked against the
signature, nothing built). All problems are reported at once in one
:class:`~baton.errors.ConfigError`, each with its dotted key path and YAML line.

What wins when a config and a checkpoint disagree (one place, here):

* architecture (the ``model`` section): neither; resuming is refused with a clear error;
* seed: the checkpoint, with a warning (see ``SingleDeviceStrategy.resume``);
* horizon (``train.max_epochs``/``max_iters``) and everything else: the config, so a
  finished run can be extended by raising ``max_epochs``.
"""

import difflib
import hashlib
import inspect
import json
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
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
)

from baton import components
from baton.errors import ConfigError
from baton.schedulers import SCHEDULERS, _accepted_args
from baton.strategy import check_experiment_name

# Limits on what a config file may be; configs also arrive from a web form.
MAX_CONFIG_BYTES = 1 << 20
MAX_NESTING = 32
MAX_STRING = 4096


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


class OptimWrapperConfig(_Strict):
    """The optimizer and how it is stepped."""

    type: Literal["OptimWrapper", "AmpOptimWrapper"] = "OptimWrapper"
    optimizer: Component
    accumulative_counts: int = Field(1, ge=1, le=1024)
    clip_grad: dict[str, Any] | None = None


class TrainConfig(_Strict):
    """The horizon: exactly one of ``max_epochs`` and ``max_iters``."""

    max_epochs: int | None = Field(None, ge=1, le=100_000)
    max_iters: int | None = Field(None, ge=1, le=1_000_000_000)
    val_interval: int = Field(1, ge=1, description="validate every this many epochs")
    log_interval: int = Field(50, ge=1, description="a metrics.jsonl record every N iterations")


class CheckpointPolicy(_Strict):
    """When checkpoints are written and which survive."""

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


class LoadFrom(_Strict):
    """Weights to start from (not a resume: optimizer and position start fresh)."""

    uri: str
    revise_keys: list[tuple[str, str]] = [(r"^module\.", "")]
    strict: bool = False


class AutoScaleLR(_Strict):
    """Scale learning rates by ``batch_size / base_batch_size``."""

    enable: bool = False
    base_batch_size: int = Field(ge=1)


def _safe_relative_dir(value: str) -> str:
    if any(part == ".." for part in Path(value).parts):
        raise ValueError("must not contain '..'")
    return value


class PipelineConfig(_Strict):
    """A whole training pipeline. Every default is visible here."""

    experiment_name: str = Field(description="stable name of the experiment folder")
    work_dir: Annotated[str, AfterValidator(_safe_relative_dir)] = "work_dirs"
    allowed_modules: list[str] = Field(
        default_factory=list, description="extra module prefixes a dotted 'type' may use"
    )
    allowed_schemes: list[str] = Field(
        default_factory=list,
        description="URI schemes load_from and resume may use beyond local paths (https, s3...)",
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
    resume: str = Field("auto", description="'auto' (newest valid), 'never', or a checkpoint URI")
    load_from: LoadFrom | None = None
    compile: bool | dict[str, Any] = False
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


def parse_yaml(text: str, source: str = "<config>") -> tuple[dict, Positions]:
    """Parse YAML text into a mapping and the line/column of every key.

    Raises:
        ConfigError: Syntax errors (with their line), a document that is not a mapping,
            duplicate keys, or a document too large or too deep.
    """
    if len(text.encode("utf-8", errors="replace")) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: config is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
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


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``key.path=value`` strings; values are read as YAML (typed).

    Raises:
        ConfigError: An item without ``=`` or with a value that is not valid YAML.
    """
    parsed: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, _, raw = item.partition("=")
        try:
            parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from err
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
    for item in err.errors():
        loc = tuple(
            p
            for p in item["loc"]
            if not (isinstance(p, str) and p.startswith(("function-", "union[")))
        )
        # Unions report one error per option; keep the path without the option tags.
        line, column = _locate(loc, positions)
        if item["type"] == "extra_forbidden":
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


def _dedupe(problems: list[ConfigProblem]) -> list[ConfigProblem]:
    seen, out = set(), []
    for problem in problems:
        key = (problem.path, problem.message)
        if key not in seen:
            seen.add(key)
            out.append(problem)
    return out


# Arguments each kind of component receives from the builder, not from the config.
_SUPPLIED = {
    "optimizer": {"params"},
    "scheduler": {"optimizer"},
}


def _component_problems(data: dict, positions: Positions) -> list[ConfigProblem]:
    """Check every component's ``type`` and arguments without building anything."""
    prefixes = data.get("allowed_modules") or []
    if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
        prefixes = []
    found: list[tuple[tuple, Any, str]] = []
    for key in ("model", "loss"):
        found.append(((key,), data.get(key), "component"))
    for key in ("train_data", "val_data"):
        section = data.get(key)
        if isinstance(section, dict):
            found.append(((key, "dataset"), section.get("dataset"), "component"))
    wrapper = data.get("optim_wrapper")
    if isinstance(wrapper, dict):
        found.append((("optim_wrapper", "optimizer"), wrapper.get("optimizer"), "optimizer"))
    schedulers = data.get("param_scheduler")
    if isinstance(schedulers, list):
        for index, item in enumerate(schedulers):
            found.append((("param_scheduler", index), item, "scheduler"))
    problems = []
    for path, cfg, kind in found:
        if isinstance(cfg, dict) and isinstance(cfg.get("type"), str) and cfg["type"]:
            problems += _check_component(path, cfg, kind, prefixes, positions)
    return problems


def _check_component(
    path: tuple, cfg: dict, kind: str, prefixes: list[str], positions: Positions
) -> list[ConfigProblem]:
    type_path = (*path, "type")
    line, column = _locate(type_path, positions)
    if kind == "scheduler":
        cls = SCHEDULERS.get(cfg["type"])
        if cls is None:
            message = f"unknown scheduler {cfg['type']!r}; choose one of {', '.join(SCHEDULERS)}"
            return [ConfigProblem(_dotted(type_path), message, line, column)]
        accepted = set(_accepted_args(cls)) | {"convert_to_iter_based"}
        unknown = sorted(set(cfg) - accepted - {"type"})
        problems = []
        for name in unknown:
            where = _locate((*path, name), positions)
            problems.append(
                ConfigProblem(
                    _dotted((*path, name)),
                    f"{cfg['type']} has no argument {name!r}; "
                    f"it accepts {', '.join(sorted(accepted))}",
                    *where,
                )
            )
        if cfg.get("convert_to_iter_based") and cfg.get("by_epoch") is False:
            problems.append(
                ConfigProblem(
                    _dotted((*path, "convert_to_iter_based")),
                    "only an epoch-based scheduler (by_epoch: true) can be converted",
                    *_locate((*path, "convert_to_iter_based"), positions),
                )
            )
        return problems
    try:
        factory = components.resolve_type(cfg["type"], extra_prefixes=prefixes)
    except ValueError as err:
        return [ConfigProblem(_dotted(type_path), str(err), line, column)]
    return _signature_problems(path, cfg, factory, _SUPPLIED.get(kind, set()), positions)


def _signature_problems(
    path: tuple, cfg: dict, factory: Any, supplied: set[str], positions: Positions
) -> list[ConfigProblem]:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return []
    params = signature.parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    args = {k: v for k, v in cfg.items() if k != "type"}
    problems = []
    if not takes_any:
        for name in sorted(set(args) - set(params)):
            accepted = [p for p in params if p not in supplied and p != "self"]
            problems.append(
                ConfigProblem(
                    _dotted((*path, name)),
                    f"{cfg['type']} has no argument {name!r}; it accepts {', '.join(accepted)}",
                    *_locate((*path, name), positions),
                )
            )
    for name, param in params.items():
        required = param.default is param.empty and param.kind in (
            param.POSITIONAL_OR_KEYWORD,
            param.KEYWORD_ONLY,
        )
        if required and name not in args and name not in supplied:
            problems.append(
                ConfigProblem(
                    _dotted((*path, name)),
                    f"{cfg['type']} needs argument {name!r}",
                    *_locate(path, positions),
                )
            )
    return problems


def _semantic_problems(cfg: PipelineConfig, positions: Positions) -> list[ConfigProblem]:
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
    if cfg.resume not in ("auto", "never") and not cfg.resume.strip():
        add(("resume",), "resume must be 'auto', 'never' or a checkpoint URI")
    uris = [(("resume",), cfg.resume)]
    if cfg.load_from is not None:
        uris.append((("load_from", "uri"), cfg.load_from.uri))
    for path, uri in uris:
        if "://" in uri:
            scheme = uri.split("://", 1)[0]
            if scheme != "file" and scheme not in cfg.allowed_schemes:
                add(
                    path,
                    f"scheme {scheme!r} is not allowed (configs may come from the UI); add it "
                    f"to allowed_schemes, e.g. allowed_schemes: [{scheme}]",
                )
    return problems


def _summary(source: str, problems: list[ConfigProblem]) -> str:
    count = len(problems)
    lines = [f"{source}: {count} problem{'s' if count != 1 else ''} in the config:"]
    lines += [f"  - {p}" for p in problems]
    return "\n".join(lines)


def validate(
    data: Mapping, positions: Positions | None = None, source: str = "<config>"
) -> PipelineConfig:
    """Validate a config mapping; every problem is reported at once.

    Raises:
        ConfigError: With ``problems`` listing each one (path, line, message).
    """
    positions = positions or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: a config must be a mapping, found {type(data).__name__}")
    data = dict(data)
    problems: list[ConfigProblem] = []
    config = None
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as err:
        problems += _pydantic_problems(err, positions)
    problems += _component_problems(data, positions)
    if config is not None:
        problems += _semantic_problems(config, positions)
    problems = _dedupe(problems)
    if problems or config is None:
        raise ConfigError(_summary(source, problems), problems)
    return config


def load_config(
    source: str | Path | Mapping,
    overrides: Mapping[str, Any] | Iterable[str] = (),
) -> PipelineConfig:
    """Load and validate a pipeline config from a YAML file, YAML text or a mapping.

    Args:
        source: A path to a YAML file, a mapping (an inline config from the UI), or
            YAML text (anything containing a newline or a colon and not a file).
        overrides: Dotted-key overrides (see :func:`apply_overrides`).

    Raises:
        ConfigError: Anything wrong, all at once; nothing is created on disk.
    """
    if isinstance(source, Mapping):
        data, positions, name = json.loads(json.dumps(source, default=str)), {}, "<inline config>"
    elif not isinstance(source, (str, Path)):
        raise ConfigError(
            f"a config is a path to a YAML file, YAML text or a mapping; got a "
            f"{type(source).__name__}"
        )
    else:
        path = Path(source)
        text_like = isinstance(source, str) and ("\n" in source or source.strip().startswith("{"))
        if not text_like and path.suffix in (".yaml", ".yml"):
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError as err:
                raise ConfigError(f"config file {str(path)!r} does not exist") from err
            except (OSError, UnicodeDecodeError) as err:
                raise ConfigError(f"config file {str(path)!r} cannot be read: {err}") from err
            name = str(path)
        else:
            text, name = str(source), "<config text>"
        data, positions = parse_yaml(text, name)
    if overrides:
        data = apply_overrides(data, overrides)
    return validate(data, positions, name)
