"""Every hostile payload against every entry point that takes configs: refused, told
why, no trace left, and in bounded time.

Entry points here: ``baton validate``, ``baton run`` and ``baton evaluate`` (the CLI
as a user runs it), and the engine API (``load_config``, ``SingleDeviceStrategy``).
The flows' parameters through a real deployment are in ``test_deployment.py``.
"""

import re

import pytest

from baton import SingleDeviceStrategy
from baton.config import load_config
from baton.errors import ConfigError
from baton.flows.cli import main

from .payloads import NAMES, config_file, listening, payloads

pytestmark = pytest.mark.timeout(120)

ENTRY_POINTS = ("validate", "run", "evaluate", "engine")


def _attack(entry: str, config: str, overrides: list[str], capsys) -> str:
    """Run one entry point; return what the user is told."""
    sets = [item for o in overrides for item in ("--set", o)]
    if entry == "engine":
        with pytest.raises(ConfigError) as err:
            load_config(config, overrides)
        return str(err.value)
    if entry == "evaluate":
        argv = ["evaluate", "checkpoint.pth", "--config", config, *sets]
    else:
        argv = [entry, config, *sets]
    assert main(argv) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("name", NAMES)
def test_payload_is_refused_with_no_effect(entry, name, tmp_path, capsys):
    with listening() as listener:
        chosen = {p.name: p for p in payloads(tmp_path, listener)}
        assert list(chosen) == NAMES
        payload = chosen[name]
        told = _attack(entry, str(config_file(tmp_path)), payload.overrides, capsys)
        assert re.search(payload.refusal, told), told
        assert not payload.effect(), f"{name} had an effect through {entry}"
        assert not (tmp_path / "wd").exists(), "a refused config created the work dir"


def test_the_payload_function_really_runs_commands(tmp_path):
    """A control: the marker check is not vacuous, the function does run a command."""
    import importlib

    with listening() as listener:
        payload = next(
            p for p in payloads(tmp_path, listener) if p.name == "command through a torch function"
        )
        run = importlib.import_module("torch.utils.collect_env").run
        run(f"touch {tmp_path / 'owned'}")
        assert payload.effect()


@pytest.mark.parametrize(
    "model",
    [
        {"type": "torch.utils.collect_env.run", "command": "touch {marker}"},
        {"type": "torch.hub.load", "repo_or_dir": "{marker}", "model": "x"},
        {"type": "subprocess.Popen", "args": "touch {marker}", "shell": True},
    ],
)
def test_the_strategy_refuses_what_the_config_would(model, tmp_path, work_dir):
    marker = tmp_path / "owned"
    model = {k: v.format(marker=marker) if isinstance(v, str) else v for k, v in model.items()}
    strategy = SingleDeviceStrategy(work_dir=str(work_dir), experiment_name="api")
    with pytest.raises(ConfigError, match="not an nn.Module subclass|outside the allowed modules"):
        strategy.prepare(model)
    assert not marker.exists()
