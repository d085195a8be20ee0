"""The checks a config goes through after parsing, each returning :class:`ConfigProblem`\\s.

:func:`baton.config.loading.validate` runs them in order and reports everything they find at
once: the schema's errors (translated from pydantic into key paths, lines and hints),
every component's ``type`` and arguments (nothing built), the rules that span several
keys (the operator's quotas on the horizon, the loaders and the checkpoint plan among
them), and finally a build of model, loss and optimizer on the meta device, where the
model's parameters are counted against its quota.
"""

import difflib
import inspect
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ValidationError

from baton import build
from baton.config.parsing import ConfigProblem, Positions, dotted, locate
from baton.config.plan import plan_bytes_problem, plan_problems
from baton.config.schema import PipelineConfig
from baton.errors import ConfigError, MissingInputError, UntrustedInputError, short_repr
from baton.experiment.folder import Experiment
from baton.trust.allowances import SETTINGS, Trust, where_to_set
from baton.trust.quotas import QUOTAS, Quotas, state_bytes, where_to_change

# --- the schema's errors -------------------------------------------------------------


def pydantic_problems(
    err: ValidationError, positions: Positions, schema: type[BaseModel]
) -> list[ConfigProblem]:
    """The problems in ``err`` (raised by ``schema``), with key paths, lines and hints."""
    problems = []
    models = _model_names(schema)
    items = [(_without_union_tags(item["loc"], models), item) for item in err.errors()]
    deeper = {loc[:-1] for loc, _ in items if loc}
    for loc, item in items:
        # A union (``bool | CompileConfig``) reports one error per option; a mapping
        # given where a scalar option failed is about the other option's keys.
        if item["type"].endswith("_type") and loc in deeper:
            continue
        line, column = locate(loc, positions)
        if item["type"] == "extra_forbidden" and loc and loc[-1] in SETTINGS:
            message = (
                f"{loc[-1]} is not a config key: what a run may reach is the operator's "
                f"decision, not the config's; {where_to_set(str(loc[-1]))}"
            )
        elif item["type"] == "extra_forbidden" and loc and loc[-1] in QUOTAS:
            message = (
                f"{loc[-1]} is not a config key: quotas are the operator's decision, not "
                f"the config's; {where_to_change(str(loc[-1]))}"
            )
        elif item["type"] == "extra_forbidden":
            allowed = _fields_at(schema, loc[:-1]) or []
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            message = "unknown key"
            if hint:
                message += f"; did you mean {hint[0]!r}?"
            if allowed:
                message += f" Allowed here: {', '.join(allowed)}"
        elif item["type"] == "missing":
            message = "required key is missing"
        else:
            message = f"{item['msg']}; found {short_repr(item.get('input'))}"
        problems.append(ConfigProblem(dotted(loc), message, line, column))
    return dedupe(problems)


def _model_names(model: type[BaseModel]) -> set[str]:
    """The names of ``model`` and of every model nested in its fields: pydantic puts them
    in an error's location as tags of union options."""
    names = {model.__name__}
    for field in model.model_fields.values():
        nested = _unwrap(field.annotation)
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            names |= _model_names(nested)
    return names


def _without_union_tags(loc: tuple, models: set[str]) -> tuple:
    """The key path without the tags pydantic adds for union options and validators
    (``function-after[...]``, ``union[...]``, ``bool``, ``CompileConfig``)."""
    kept = tuple(
        p
        for p in loc
        if not isinstance(p, str)
        or not (p.startswith(("function-", "union[")) or p in models or p in _TYPE_TAGS)
    )
    return kept if kept or not loc else tuple(loc)


_TYPE_TAGS = {"bool", "int", "float", "str", "list", "dict", "tuple", "none", "literal"}


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


def dedupe(problems: list[ConfigProblem]) -> list[ConfigProblem]:
    """``problems`` in order, each (path, message) once."""
    seen, out = set(), []
    for problem in problems:
        key = (problem.path, problem.message)
        if key not in seen:
            seen.add(key)
            out.append(problem)
    return out


# --- components, cross-key rules and a build on the meta device ----------------------


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


def component_problems(data: Mapping, positions: Positions, trust: Trust) -> list[ConfigProblem]:
    """Check every component's ``type`` (kind and trust) and arguments, building nothing."""
    problems = []
    for path, cfg, kind in _slots(data):
        if isinstance(cfg, Mapping) and isinstance(cfg.get("type"), str) and cfg["type"]:
            for where, message in build.check(cfg, kind, trust=trust, path=path):
                problems.append(ConfigProblem(dotted(where), message, *locate(where, positions)))
    return problems


def quotas_for(cfg: PipelineConfig, trust: Trust) -> Quotas:
    """The operator's quotas for a run of ``cfg``, set where ``trust`` was read from: its
    defaults derived from the filesystem of the work dir (the project's, when the work dir
    is refused)."""
    try:
        folder = trust.check_work_dir(cfg.work_dir)
    except UntrustedInputError:
        folder = trust.project_dir
    return Quotas.of(trust, folder=folder)


def compile_problems(data: Mapping, positions: Positions, trust: Trust) -> list[ConfigProblem]:
    """The method ``compile.target`` names must be one the model's class defines (its
    ``forward`` or its own method), not an attribute, a submodule or one of ``nn.Module``'s
    own methods: the strategy replaces ``model.<target>`` by its compiled form. Checked on
    the class, so it is reported with every other problem, even when the model's
    arguments are wrong."""
    section = data.get("compile")
    model = data.get("model")
    if not isinstance(section, Mapping) or not isinstance(model, Mapping):
        return []
    target = section.get("target", "forward")
    if not isinstance(target, str):
        return []  # the schema reports it
    try:
        cls = build.resolve(model.get("type"), "model", trust)
    except ConfigError:
        return []  # reported with the model's other problems
    if not inspect.isclass(cls) or target in _compilable_methods(cls):
        return []
    path = ("compile", "target")
    choices = ", ".join(sorted(_compilable_methods(cls))) or "forward"
    message = (
        f"{short_repr(target)} is not a method of {cls.__name__} that can be compiled; "
        f"name one of {choices}"
    )
    return [ConfigProblem(dotted(path), message, *locate(path, positions))]


def _compilable_methods(cls: type) -> set[str]:
    """Public functions defined by ``cls`` or its bases below ``nn.Module``, and forward."""
    names = set()
    for base in cls.__mro__:
        if base in (torch.nn.Module, object):
            break
        names |= {
            name
            for name, value in vars(base).items()
            if inspect.isfunction(value) and not name.startswith("_")
        }
    return names


def semantic_problems(
    cfg: PipelineConfig, positions: Positions, trust: Trust, quotas: Quotas | None = None
) -> list[ConfigProblem]:
    """The rules that span several keys (a horizon, a best metric that needs validation,
    a plateau scheduler's validations), the operator's quotas on the horizon, the loader
    workers and the checkpoint files, and where the run may write and read."""
    quotas = quotas or quotas_for(cfg, trust)
    problems = []

    def add(path: tuple, message: str) -> None:
        problems.append(ConfigProblem(dotted(path), message, *locate(path, positions)))

    if (cfg.train.max_epochs is None) == (cfg.train.max_iters is None):
        add(("train",), "give exactly one of max_epochs and max_iters")
    else:
        for path, message in plan_problems(quotas, cfg, epoch_length=None):
            add(path, message)
    for key in ("train_data", "val_data"):
        section = getattr(cfg, key)
        if section is not None and section.num_workers > quotas.max_workers:
            add(
                (key, "num_workers"),
                quotas.refusal(f"{section.num_workers} loader workers", "max_workers", "use fewer"),
            )
    if cfg.launcher.nproc > quotas.max_processes:
        add(
            ("launcher", "nproc"),
            quotas.refusal(
                f"{cfg.launcher.nproc} training processes", "max_processes", "use fewer"
            ),
        )
    policy = cfg.checkpoint
    if policy.keep_best and not policy.best_metric:
        add(("checkpoint", "keep_best"), "keep_best needs best_metric (e.g. val/accuracy)")
    if policy.best_metric and not policy.best_metric.startswith(("val/", "train/")):
        add(("checkpoint", "best_metric"), "best_metric must start with 'val/' or 'train/'")
    if policy.best_metric and policy.best_metric.startswith("val/") and cfg.val_data is None:
        add(("checkpoint", "best_metric"), f"{policy.best_metric} needs val_data")
    for index, item in enumerate(cfg.param_scheduler):
        try:  # a short name or a dotted path, as the build resolves it
            cls = build.resolve(item["type"], "scheduler", trust)
        except ConfigError:
            continue  # reported with the component's other problems
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
        experiment = Experiment(trust.check_work_dir(cfg.work_dir), cfg.experiment_name)
    except UntrustedInputError as err:
        add(("work_dir",), str(err))
    else:
        experiment_dir = experiment.root
        try:
            experiment.check_home()
        except UntrustedInputError as err:
            add(("experiment_name",), str(err))
    uris = []
    if cfg.resume.checkpoint is not None:
        uris.append((("resume",), cfg.resume.checkpoint, "resume checkpoint"))
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


def build_problems(
    cfg: PipelineConfig, positions: Positions, trust: Trust, quotas: Quotas | None = None
) -> list[ConfigProblem]:
    """Build model, loss and optimizer on the meta device: no memory, no data, but every
    constructor runs, so a negative size or a bad learning rate is found now. The model's
    parameters and buffers are counted against the operator's quota, and the checkpoints
    the run would keep against the experiment's bytes; so are the loss's (lazy parameters have no size yet:
    they are counted when the pipeline is built, see ``Quotas.check_model``)."""
    quotas = quotas or quotas_for(cfg, trust)
    problems = []

    def add(path: tuple, err: Exception) -> None:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        problems.append(
            ConfigProblem(dotted(path), f"cannot be built: {text}", *locate(path, positions))
        )

    with torch.device("meta"):
        try:
            model = build.build(cfg.model, "model", trust=trust)
        except Exception as err:
            add(("model",), err)
            model = None
        if model is not None:
            over_quota = [
                (("model",), quotas.model_problem(model)),
                (("checkpoint",), plan_bytes_problem(quotas, cfg, state_bytes(model), None)),
            ]
            for path, message in over_quota:
                if message:
                    problems.append(ConfigProblem(dotted(path), message, *locate(path, positions)))
        try:
            loss = build.build(cfg.loss, "loss", trust=trust)
        except Exception as err:
            add(("loss",), err)
        else:
            # A loss is a module too (an Embedding of 1e10 rows is one): the same quota.
            message = quotas.model_problem(loss, "loss")
            if message:
                problems.append(ConfigProblem("loss", message, *locate(("loss",), positions)))
        if model is not None:
            try:
                build.build(
                    cfg.optim_wrapper.optimizer, "optimizer", trust=trust, params=model.parameters()
                )
            except Exception as err:
                add(("optim_wrapper", "optimizer"), err)
    return problems
