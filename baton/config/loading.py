"""Reading a pipeline config: YAML -> overrides -> a validated :class:`PipelineConfig`.

:func:`load_config` parses a file, YAML text or a mapping, applies dotted-key overrides,
and :func:`validate` checks everything before any work starts: the structure (the
schema), every component's ``type`` (importable, inside the allowed modules) and its
arguments (checked against the signature), the rules across keys and the operator's
quotas, then a build on the meta device. All problems are reported at once in one
:class:`~baton.errors.ConfigError`, each with its dotted key path and YAML line.
"""

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from baton.config.checks import (
    build_problems,
    compile_problems,
    component_problems,
    dedupe,
    pydantic_problems,
    quotas_for,
    semantic_problems,
)
from baton.config.overrides import apply_overrides
from baton.config.parsing import (
    MAX_CONFIG_BYTES,
    MAX_NESTING,
    ConfigProblem,
    Positions,
    check_depth,
    parse_yaml,
    summary,
)
from baton.config.schema import PipelineConfig
from baton.errors import ConfigError
from baton.trust.allowances import Trust, check_regular_file
from baton.trust.quotas import Quotas


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
