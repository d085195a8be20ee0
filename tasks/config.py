"""Task: validate a pipeline config (file, YAML text or mapping) with overrides."""

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from baton.config import load_config, parse_overrides


@task(name="validate-config", cache_policy=NO_CACHE)
def validate_config(
    config: str | dict[str, Any],
    overrides: list[str] | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Load and validate a config; return the resolved config as a JSON-able dict.

    Args:
        config: A path to a YAML file, YAML text, or a mapping.
        overrides: ``key.path=value`` strings.
        settings: Typed overrides by dotted key (applied after ``overrides``).

    Raises:
        ConfigError: Every problem at once; nothing is written.
    """
    combined = {**parse_overrides(overrides or []), **(settings or {})}
    return load_config(config, combined).model_dump(mode="json")
