"""The flows' parameters as the Prefect UI sends them, through a real deployment on a
real server with a real worker: every payload fails its run once, tells why in the
run's state message, and has no effect. Job variables and experiments: test_run_form.py."""

import re

import pytest

from ..deployments.test_server import TERMINAL, _stop, deployed_server, ui_parameters
from ..flows.conftest import small_config
from .payloads import listening, payloads

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

CHOSEN = (
    "self-widened allowlist",
    "command through a torch function",
    "unsafe unpickle through a loader function",
    "self-widened schemes",
    "device file as resume checkpoint",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with deployed_server(tmp_path_factory.mktemp("prefect_home")) as instance:
        yield instance


def test_hostile_parameters_fail_once_and_do_nothing(server, tmp_path):
    with listening() as listener:
        chosen = [p for p in payloads(tmp_path, listener) if p.name in CHOSEN]
        runs = {}
        for index, payload in enumerate(chosen):
            parameters = ui_parameters(small_config(tmp_path / f"wd{index}", name=f"p{index}"))
            parameters["overrides"] = payload.overrides
            runs[payload.name] = server.create_run("train-pipeline/train-from-ui", parameters)
        parameters = ui_parameters(None)
        parameters["config"] = "configs/../../../../etc/passwd.yaml"
        runs["config outside configs/"] = server.create_run(
            "train-pipeline/train-from-ui", parameters
        )
        worker = server.worker()
        try:
            finals = {name: server.wait_state(r, TERMINAL, timeout=300) for name, r in runs.items()}
        finally:
            _stop(worker)
        assert finals == dict.fromkeys(runs, "FAILED")
        expected = {p.name: p.refusal for p in chosen}
        expected["config outside configs/"] = r"outside the project's configs/ folder"
        for name, run_id in runs.items():
            run = server.run(run_id)
            assert run["run_count"] == 1, f"{name}: retried"
            assert re.search(expected[name], run["state"]["message"] or ""), run["state"]
        assert not [p.name for p in chosen if p.effect()]
        assert listener.requests == []
