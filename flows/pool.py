"""The work pool's side of the Run form: what a run's job variables may change (nothing).

Whoever can open a deployment's Run form can also send job variables, and a process
worker fills its job (the command, the environment, the working folder) from the work
pool's base job template with them. Prefect's default template lets them set all three:
a run could start any command, or an interpreter whose environment runs one
(``PYTHONWARNINGS``, ``BROWSER``, ``PYTHONPATH``, ``LD_PRELOAD``), before baton's checks.

baton ships ``deployments/pool-template.json``: a variables schema that admits no job
variable (``additionalProperties: false``, so the server refuses such a run when it is
created, with the reason) and a job configuration with no placeholder and no ``env``
mapping (so job variables that reach a worker by another route, such as a flow run
created without its deployment's validation, change nothing either). The command is
Prefect's own, the environment the worker's, the folder the deployment's pull step.

This module checks a pool's template: at deploy time (:func:`check_work_pool`, a build
step of ``deployments/prefect.yaml``) and when a flow run starts (:func:`check_this_run`),
so that a pool created with Prefect's default template is found and the operator is told
what to run.
"""

import json
import os
import re
from typing import Any
from uuid import UUID

from prefect import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run

from baton.errors import UntrustedInputError
from baton.trust import Trust

TEMPLATE = "deployments/pool-template.json"
_PLACEHOLDER = re.compile(r"\{\{.*?\}\}", re.S)


def unsafe_template(base_job_template: dict[str, Any]) -> list[str]:
    """What in a work pool's base job template lets a run's job variables change how or
    where its process runs; empty when nothing does."""
    variables = base_job_template.get("variables") or {}
    configuration = base_job_template.get("job_configuration") or {}
    reasons = []
    if variables.get("additionalProperties", True) is not False:
        reasons.append("its variables schema admits any job variable")
    if variables.get("properties"):
        admitted = ", ".join(sorted(variables["properties"]))
        reasons.append(f"a run's job variables may set {admitted}")
    placeholders = sorted(set(_PLACEHOLDER.findall(json.dumps(configuration))))
    if placeholders:
        reasons.append(f"its job configuration takes {', '.join(placeholders)}")
    if isinstance(configuration.get("env"), dict):
        # Prefect's worker merges a run's `env` job variable into an env mapping of the
        # job configuration, validated or not.
        reasons.append("its job configuration has an env mapping, which a run's env extends")
    return reasons


def refusal(pool: str, reasons: list[str]) -> str:
    """The one-line refusal for the unsafe pool ``pool``."""
    return (
        f"work pool {pool!r} lets a run's job variables change how its process runs "
        f"({'; '.join(reasons)}); run `prefect work-pool update {pool} --base-job-template "
        f"{TEMPLATE}` from the project root (deployments/README.md)"
    )


def check_work_pool(work_pool: str) -> dict[str, str]:
    """Deploy-time check (a build step of ``deployments/prefect.yaml``): refuse to deploy
    to a pool that does not exist or whose template lets a run's job variables through.

    Raises:
        RuntimeError: With what the operator should run instead.
    """
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(work_pool)
        except ObjectNotFound:
            raise RuntimeError(
                f"work pool {work_pool!r} does not exist; create it with `prefect work-pool "
                f"create {work_pool} --type process --base-job-template {TEMPLATE}`"
            ) from None
    reasons = unsafe_template(pool.base_job_template)
    if reasons:
        raise RuntimeError(refusal(work_pool, reasons))
    if not os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY"):
        print(
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY is not set here; start each worker with "
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30 so that baton-crash-silent-runs can tell "
            "a dead machine (deployments/README.md)"
        )
    return {"work_pool": work_pool}


def check_this_run(run: FlowRun | None, *, retries: int = 0) -> str | None:
    """Refuse a flow run that carries job variables or retries of its own, or runs on a
    pool whose template lets job variables through; return the run's deployment as
    ``<flow>/<deployment>`` (None for a run that has no deployment, such as ``baton run``).

    Args:
        run: The flow run, as the server has it.
        retries: The flow's own ``retries``: a run may not ask for more (the API takes an
            ``empirical_policy`` with any number, and Prefect's engine keeps it).

    Raises:
        UntrustedInputError: With the reason and what to do instead (a permanent error:
            the run fails once).
    """
    if run is None:
        return None
    if run.job_variables:
        raise UntrustedInputError(
            f"this run sets job variables ({', '.join(sorted(map(str, run.job_variables)))}); "
            "a run may set none: the command, environment and folder of its process are the "
            "operator's (the work pool's template and the worker's environment)"
        )
    asked = run.empirical_policy.retries if run.empirical_policy else None
    if asked is not None and asked > retries:
        raise UntrustedInputError(
            f"this run asks for {asked} flow retries, more than the flow's own {retries}; "
            "create runs without an empirical_policy"
        )
    if run.deployment_id is None:
        return None
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment(run.deployment_id)
        except ObjectNotFound:
            raise UntrustedInputError(
                f"this run's deployment {run.deployment_id} no longer exists; start the run "
                "from a deployment that does"
            ) from None
        if run.flow_id != deployment.flow_id:
            # The flow-run API takes any flow id beside a deployment's: the deployment's
            # own flow names its folder, never the run's.
            raise UntrustedInputError(
                "this run names another flow than its deployment's; start it from the "
                "deployment (its Run form or `prefect deployment run`)"
            )
        flow = client.read_flow(deployment.flow_id)
        if run.work_pool_name:
            reasons = unsafe_template(client.read_work_pool(run.work_pool_name).base_job_template)
            if reasons:
                raise UntrustedInputError(refusal(run.work_pool_name, reasons))
    return f"{flow.name}/{deployment.name}"


def checked_run(*, retries: int = 0) -> tuple[FlowRun | None, str | None]:
    """This flow run as the server has it, checked by :func:`check_this_run` against the
    flow's own ``retries``, and its deployment (``None, None`` outside a flow run)."""
    run_id = flow_run.get_id()
    if not run_id:
        return None, None
    with get_client(sync_client=True) as client:
        this = client.read_flow_run(UUID(str(run_id)))
    return this, check_this_run(this, retries=retries)


def work_dir_of(deployment: str | None, work_dir: str | None) -> str | None:
    """The ``work_dir`` setting of a run: a deployment's runs keep their experiments in
    the deployment's folder (:class:`baton.trust.Trust`), whatever their config says; a
    ``work_dir`` parameter is kept, and refused by the config checks unless it names
    that folder. Call it inside :func:`baton.trust.deployment_environment`."""
    if deployment is None or work_dir is not None:
        return work_dir
    folder = Trust.from_environment().deployment_work_dir
    print(f"deployment {deployment!r} keeps its experiments in {folder}")
    return str(folder)


def read_run(run_id: str | UUID) -> FlowRun | None:
    """The flow run ``run_id`` as the server has it; None when it cannot be read."""
    try:
        with get_client(sync_client=True) as client:
            return client.read_flow_run(UUID(str(run_id)))
    except Exception:  # not an id, not found, server unreachable: the caller decides
        return None
