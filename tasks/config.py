"""Task: validate a pipeline config (file, YAML text or mapping) with overrides."""

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from baton.config import load_config, run_settings


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
        settings: The run's own settings (``experiment_name``, ``resume``, ``work_dir``,
            ``fork``), applied after ``overrides`` where not ``None``.

    Raises:
        ConfigError: Every problem at once, or a config path outside configs/ and the
            operator's config roots; nothing is written.
    """
    combined = run_settings(overrides, **(settings or {}))
    # A config path in a run's parameters names a file in configs/ (or an operator's
    # config root), never any file the worker can read.
    return load_config(config, combined, from_parameter=True).model_dump(mode="json")
