"""Task: validate a pipeline config (file, YAML text or mapping) with overrides."""

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext

from baton.config import load_config, run_settings
from baton.errors import UntrustedInputError
from baton.quotas import QUOTAS
from baton.trust import SETTINGS

# Environment variables that decide what a run may reach: the operator's, never a run's.
TRUST_VARIABLES = frozenset(
    {env for env, _ in SETTINGS.values()}
    | {env for env, _ in QUOTAS.values()}
    | {"BATON_PROJECT_DIR"}
)


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
    refuse_trust_from_the_run()
    combined = run_settings(overrides, **(settings or {}))
    # A config path in a run's parameters names a file in configs/ (or an operator's
    # config root), never any file the worker can read.
    return load_config(config, combined, from_parameter=True).model_dump(mode="json")


def refuse_trust_from_the_run() -> None:
    """Refuse a flow run that carries trust settings in its own job variables.

    Whoever can start a run of a deployment can also give it job variables, and a
    process worker puts their ``env`` into the run's environment, where
    :mod:`baton.trust` reads trust from. The deployment's and the work pool's job
    variables are the operator's; a run's own are parameters like any other.

    Raises:
        UntrustedInputError: The run's own job variables set one of ``TRUST_VARIABLES``.
    """
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    env = (context.flow_run.job_variables or {}).get("env") or {}
    found = sorted(TRUST_VARIABLES & set(env)) if isinstance(env, dict) else []
    if found:
        raise UntrustedInputError(
            f"this run sets {', '.join(found)} in its own job variables; trust settings "
            "belong to the deployment's or work pool's job variables or the worker's "
            "environment: ask an operator to set them there"
        )
