"""What the operator allows a run, and how much: read from the operator only.

Owns the allowances (module prefixes a ``type:`` may name, URI schemes, the folders a run
may read and write, a deployment's own folder: :mod:`baton.trust.allowances`) and the
quotas (parameters, iterations, loader workers, an experiment's checkpoint files and
bytes, free disk: :mod:`baton.trust.quotas`), both read from the worker's environment and
``[tool.baton]`` in the project's pyproject.toml, never from a config or a run's
parameters. Every other package asks it; it imports nothing of baton but ``errors`` and
``randomness``.

The operator's settings are read once per run: a :class:`Trust` keeps the reading it was
made from (:class:`OperatorSettings`), and the quotas of that reading follow from it
(:meth:`Quotas.of`); a run's entry holds its trust for the code it calls
(:func:`held_trust`, :func:`deployment_environment`).
"""

from baton.trust.allowances import (
    DEFAULT_DEPLOYMENTS_WORK_DIR,
    DEFAULT_MODULES,
    DENIED_MODULES,
    DEPLOYMENT_KEYS,
    DEPLOYMENT_VARIABLE,
    DEPLOYMENTS_WORK_DIR_VARIABLE,
    MAX_CONFIG_FILE_BYTES,
    MAX_NAME_BYTES,
    SETTINGS,
    SUBTABLES,
    OperatorSettings,
    Trust,
    check_deployment_name,
    check_regular_file,
    deployment_environment,
    held_trust,
    holds_trust,
    project_dir,
    pyproject_subtable,
    where_to_set,
)
from baton.trust.quotas import QUOTAS, Quotas, where_to_change

__all__ = [
    "DEFAULT_DEPLOYMENTS_WORK_DIR",
    "DEFAULT_MODULES",
    "DENIED_MODULES",
    "DEPLOYMENTS_WORK_DIR_VARIABLE",
    "DEPLOYMENT_KEYS",
    "DEPLOYMENT_VARIABLE",
    "MAX_CONFIG_FILE_BYTES",
    "MAX_NAME_BYTES",
    "QUOTAS",
    "SETTINGS",
    "SUBTABLES",
    "OperatorSettings",
    "Quotas",
    "Trust",
    "check_deployment_name",
    "check_regular_file",
    "deployment_environment",
    "held_trust",
    "holds_trust",
    "project_dir",
    "pyproject_subtable",
    "where_to_change",
    "where_to_set",
]
