"""The whole Run form is untrusted: job variables, and the experiments a run may touch.

Through a real ``prefect server`` on 127.0.0.1, the work pool created from the shipped
``deployments/pool-template.json`` as deployments/README.md says, every deployment of
``deployments/prefect.yaml`` and a real worker. Each payload is shown to have no effect
(a marker file that is never made, a victim experiment whose files do not change) and to
be refused with its reason.
"""

import hashlib
import json
import re
import subprocess
from pathlib import Path
from uuid import uuid4

import pytest
from prefect.client.schemas.objects import FlowRun
from prefect.workers.process import ProcessWorker

from baton.errors import UntrustedInputError
from baton.flows.pool import check_this_run, unsafe_template
from baton.trust import Trust

from ..deployments.test_server import (
    DEPLOY,
    POOL,
    ROOT,
    TEMPLATE,
    TERMINAL,
    _stop,
    deployed_server,
    ui_parameters,
)
from ..flows.conftest import small_config

UI = "train-pipeline/train-from-ui"
NIGHTLY = "train-pipeline/nightly-digits-mlp"
EVALUATE = "evaluate-checkpoint/evaluate"


def _interpreter_payload(marker: Path) -> dict[str, str]:
    """Environment variables that run a command when a Python interpreter starts: the
    warning filter imports ``antigravity``, which opens ``BROWSER``."""
    return {
        "PYTHONWARNINGS": "all:0:antigravity.x:0:0",
        "BROWSER": f"/bin/sh -c 'touch {marker}' #%s",
    }


def _job_variable_payloads(marker: Path) -> dict[str, dict]:
    return {
        "command": {"command": f"/bin/sh -c 'touch {marker}'"},
        "interpreter start-up": {"env": _interpreter_payload(marker)},
        "PYTHONPATH": {"env": {"PYTHONPATH": str(marker.parent)}},
        "LD_PRELOAD": {"env": {"LD_PRELOAD": str(marker.parent / "evil.so")}},
        "trust": {"env": {"BATON_ALLOWED_MODULES": "tests,subprocess"}},
        "restart bound": {"env": {"BATON_RESTART_LIMIT": "1000"}},
        "working_dir": {"working_dir": str(marker.parent)},
        "anything else": {"stream_output": False, "labels": {"a": "b"}},
    }


# Without a server --------------------------------------------------------------------


def test_prefects_default_template_is_unsafe_and_batons_is_not():
    reasons = unsafe_template(ProcessWorker.get_default_base_job_template())
    text = "; ".join(reasons)
    assert "admits any job variable" in text
    assert all(f"{{{{ {key} }}}}" in text for key in ("command", "env", "working_dir"))
    assert unsafe_template(json.loads((ROOT / TEMPLATE).read_text())) == []
    # a fixed env mapping is extended by a run's env where Prefect does not validate it
    fixed_env = {"job_configuration": {"env": {"A": "1"}}, "variables": {"properties": {}}}
    assert len(unsafe_template(fixed_env)) == 2


def test_a_run_cannot_ask_for_more_retries_than_its_flow():
    """The API takes any empirical_policy, and Prefect's engine keeps a run's retries: a
    transient error would then be retried as often as the run's creator asked."""
    policy = {"retries": 1_000_000_000, "retry_delay": 0}
    run = FlowRun(flow_id=uuid4(), empirical_policy=policy)
    with pytest.raises(UntrustedInputError, match="asks for 1000000000 flow retries, more than"):
        check_this_run(run, retries=1)
    assert (
        check_this_run(FlowRun(flow_id=uuid4(), empirical_policy={"retries": 1}), retries=1) is None
    )


def _project(tmp_path: Path, table: str = "") -> Path:
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text(f"[tool.baton]\n{table}")
    return project


def test_a_deployment_writes_only_in_its_own_folder(tmp_path):
    project = _project(tmp_path)
    env = {"BATON_PROJECT_DIR": str(project), "BATON_DEPLOYMENT": UI}
    trust = Trust.from_environment(env)
    folder = project / "work_dirs" / "deployments" / "train-pipeline" / "train-from-ui"
    assert trust.deployment_work_dir == folder
    assert trust.check_work_dir(str(folder)) == folder
    for other in ("work_dirs", str(folder.parent / "nightly-digits-mlp"), str(tmp_path)):
        with pytest.raises(UntrustedInputError, match="keep their experiments in .*leave work_dir"):
            trust.check_work_dir(other)
    # Without a deployment (a local `baton run`) nothing changes.
    assert Trust.from_environment({"BATON_PROJECT_DIR": str(project)}).deployment is None


def test_the_operator_gives_deployments_folders_and_checkpoint_roots(tmp_path):
    table = (
        f'[tool.baton.deployments."{NIGHTLY}"]\nwork_dir = "nightly"\n'
        f'[tool.baton.deployments."{EVALUATE}"]\ncheckpoint_roots = ["nightly"]\n'
    )
    project = _project(tmp_path, table)
    env = {"BATON_PROJECT_DIR": str(project)}
    nightly = Trust.from_environment({**env, "BATON_DEPLOYMENT": NIGHTLY})
    assert nightly.deployment_work_dir == project / "nightly"
    evaluate = Trust.from_environment({**env, "BATON_DEPLOYMENT": EVALUATE})
    assert project / "nightly" in evaluate.checkpoint_roots
    ui = Trust.from_environment({**env, "BATON_DEPLOYMENT": UI})
    assert project / "nightly" not in ui.checkpoint_roots


@pytest.mark.parametrize(
    ("table", "refusal"),
    [
        (f'[tool.baton.deployments."{UI}"]\nwork_dir = "work_dirs"\n', "overlap"),
        (
            f'[tool.baton.deployments."{UI}"]\nwork_dir = "a"\n[tool.baton.deployments."{NIGHTLY}"]\nwork_dir = "a/b"\n',
            "overlap",
        ),
        ('[tool.baton.deployments."../x"]\nwork_dir = "a"\n', "cannot have a folder"),
        (f'[tool.baton.deployments."{UI}"]\ncommand = "x"\n', "must be a table with keys"),
    ],
)
def test_a_bad_deployments_table_is_refused(tmp_path, table, refusal):
    project = _project(tmp_path, table)
    with pytest.raises(UntrustedInputError, match=refusal):
        Trust.from_environment({"BATON_PROJECT_DIR": str(project), "BATON_DEPLOYMENT": UI})


# Through a real server and worker ----------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with deployed_server(tmp_path_factory.mktemp("prefect_home")) as instance:
        yield instance


def _runs_of(server, deployment: str) -> int:
    dep = server.deployment(deployment)
    response = server.http.post(
        "/flow_runs/count", json={"deployments": {"id": {"any_": [dep["id"]]}}}
    )
    return response.json()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_job_variables_are_refused_by_the_server_and_have_no_effect(server, tmp_path):
    marker = tmp_path / "marker"
    dep = server.deployment(UI)
    before = _runs_of(server, UI)
    parameters = ui_parameters(small_config(tmp_path / "wd", name="jobvars"))
    for name, job_variables in _job_variable_payloads(marker).items():
        response = server.http.post(
            f"/deployments/{dep['id']}/create_flow_run",
            json={"parameters": parameters, "job_variables": job_variables},
        )
        assert response.status_code == 422, (name, response.text)
        assert "Additional properties are not allowed" in response.text, response.text
        assert all(key in response.text for key in job_variables), response.text
    assert _runs_of(server, UI) == before

    # Runs created without their deployment's validation (the flow-run API, not the form):
    # the job configuration has nothing for job variables to fill, and the flow refuses a
    # run with job variables, with more retries than its own, or naming another flow.
    payload = {
        "command": f"/bin/sh -c 'touch {marker}'",
        "env": _interpreter_payload(marker),
        "working_dir": str(tmp_path),
    }

    def bypass(**fields) -> str:
        response = server.http.post(
            "/flow_runs/",
            json={
                "flow_id": dep["flow_id"],
                "deployment_id": dep["id"],
                "work_pool_name": POOL,
                "parameters": parameters,
                "state": {"type": "SCHEDULED"},
                **fields,
            },
        )
        assert response.status_code == 201, response.text
        return response.json()["id"]

    evaluate_flow = server.deployment(EVALUATE)["flow_id"]
    runs = {
        "this run sets job variables (command, env, working_dir)": bypass(job_variables=payload),
        "asks for 1000 flow retries": bypass(empirical_policy={"retries": 1000, "retry_delay": 0}),
        "names another flow than its deployment's": bypass(flow_id=evaluate_flow),
    }
    worker = server.worker()
    try:
        finals = {m: server.wait_state(r, TERMINAL, timeout=300) for m, r in runs.items()}
    finally:
        _stop(worker)
    for message, run_id in runs.items():
        run = server.run(run_id)
        assert finals[message] == "FAILED", run["state"]
        assert message in run["state"]["message"], run["state"]
        assert run["run_count"] == 1
    assert not marker.exists()
    assert not (server.work_dir(UI) / "jobvars").exists()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_pool_with_prefects_default_template_is_refused_at_deploy_and_at_run(server, tmp_path):
    default = tmp_path / "default.json"
    default.write_text(json.dumps(ProcessWorker.get_default_base_job_template()))
    marker = tmp_path / "marker"
    server.cli("work-pool", "update", POOL, "--base-job-template", str(default))
    try:
        deployed = subprocess.run(
            [*DEPLOY, "-n", "evaluate"],
            env=server.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )
        output = deployed.stdout + deployed.stderr
        assert deployed.returncode != 0
        assert f"work pool '{POOL}' lets a run's job variables change how its process" in output
        assert f"prefect work-pool update {POOL} --base-job-template {TEMPLATE}" in output

        # Already deployed: the hole is open (the payload runs when the interpreter
        # starts, before any of baton's code), and the flow says so and refuses to train.
        dep = server.deployment(UI)
        parameters = ui_parameters(small_config(tmp_path / "wd", name="default-pool"))
        response = server.http.post(
            f"/deployments/{dep['id']}/create_flow_run",
            json={"parameters": parameters, "job_variables": {"env": _interpreter_payload(marker)}},
        )
        assert response.status_code == 201, response.text
        run_id = response.json()["id"]
        server.serve_once()
        run = server.run(run_id)
        assert run["state"]["type"] == "FAILED", run["state"]
        assert "this run sets job variables (env)" in run["state"]["message"]
        clean = server.create_run(UI, parameters)
        server.serve_once()
        run = server.run(clean)
        assert run["state"]["type"] == "FAILED", run["state"]
        assert f"work pool '{POOL}' lets a run's job variables" in run["state"]["message"]
        assert not (server.work_dir(UI) / "default-pool").exists()
    finally:
        server.cli("work-pool", "update", POOL, "--base-job-template", TEMPLATE)
    assert marker.exists(), "the payload is live: Prefect's default template runs it"


def _files(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.pth"))
    }


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_run_can_only_add_to_another_teams_experiment(server, tmp_path):
    victim = small_config(tmp_path / "victim", name="team-a", **{"train.max_epochs": 2})
    nightly = {**ui_parameters(victim), "overrides": []}
    worker = server.worker()
    try:
        first = server.create_run(NIGHTLY, nightly)
        assert server.wait_state(first, TERMINAL, timeout=240) == "COMPLETED"
        home = server.work_dir(NIGHTLY) / "team-a"
        committed = _files(home)
        assert len(committed) == 2

        attacks = {}
        # Another deployment, the same experiment name: its own folder.
        attacks["other deployment"] = server.create_run(
            UI,
            {
                **ui_parameters(victim),
                "overrides": ["checkpoint.keep_last=1", "train.max_epochs=4"],
            },
        )
        # The nightly's own form, shrinking the retention to delete epochs 1-3.
        attacks["retention"] = server.create_run(
            NIGHTLY,
            {**nightly, "overrides": ["checkpoint.keep_last=1", "train.max_epochs=4"]},
        )
        # Evaluate reading the nightly's checkpoint.
        attacks["evaluate"] = server.create_run(
            EVALUATE,
            {"checkpoint": str(home / "checkpoints" / "epoch_0002.pth"), "config": victim},
        )
        # restart_of naming a crashed run: of another deployment, of other parameters,
        # of a run that never trained the experiment.
        crashed = server.create_run(NIGHTLY, nightly)
        for state in ("RUNNING", "CRASHED"):
            server.http.post(
                f"/flow_runs/{crashed}/set_state", json={"state": {"type": state}, "force": True}
            ).raise_for_status()
        attacks["restart of another deployment's run"] = server.create_run(
            UI, {**ui_parameters(victim), "restart_of": crashed}
        )
        attacks["restart with other parameters"] = server.create_run(
            NIGHTLY, {**nightly, "overrides": ["train.max_epochs=3"], "restart_of": crashed}
        )
        attacks["restart of a run that never trained"] = server.create_run(
            NIGHTLY, {**nightly, "restart_of": crashed}
        )
        finals = {
            name: server.wait_state(run, TERMINAL, timeout=300) for name, run in attacks.items()
        }
        assert _files(home) == committed
        assert not (home / "runs" / "restarts.json").exists()

        # A fork adds a lineage; the next scheduled run still resumes the original.
        fork = server.create_run(
            NIGHTLY,
            {
                **nightly,
                "overrides": ["randomness.seed=11", "optim_wrapper.optimizer.lr=0.2"],
                "fork": True,
            },
        )
        assert server.wait_state(fork, TERMINAL, timeout=240) == "COMPLETED"
        scheduled = server.create_run(NIGHTLY, nightly)
        assert server.wait_state(scheduled, TERMINAL, timeout=240) == "COMPLETED", server.run(
            scheduled
        )["state"]
    finally:
        _stop(worker)
    assert finals["other deployment"] == "COMPLETED"
    assert (server.work_dir(UI) / "team-a" / "checkpoints").exists()
    refusals = {
        "retention": r"retention",
        "evaluate": r"is outside the experiment folder",
        "restart of another deployment's run": r"a run of another deployment",
        "restart with other parameters": r"ran with other overrides",
        "restart of a run that never trained": r"never trained experiment 'team-a'",
    }
    for name, pattern in refusals.items():
        run = server.run(attacks[name])
        assert finals[name] == "FAILED", (name, run["state"])
        assert run["run_count"] == 1, name
        assert re.search(pattern, run["state"]["message"] or ""), (name, run["state"])
    assert set(committed.items()) <= set(_files(home).items())
