"""Running a pipeline as a real process to kill it, and comparing the end states of runs."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from baton.checkpoint.store import CheckpointStore

ROOT = Path(__file__).resolve().parents[2]


def run_env(prefect_home: Path) -> dict[str, str]:
    """The environment of a ``baton run`` child: its own Prefect home, no API URL (so it
    starts an embedded server), and this checkout importable."""
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW="ignore",
        PYTHONPATH=str(ROOT),
    )
    env.pop("PREFECT_API_URL", None)
    return env


def start(cfg, env, tmp_path) -> subprocess.Popen:
    path = tmp_path / f"{cfg['experiment_name']}-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.Popen(
        [sys.executable, "-m", "baton.flows.cli", "run", str(path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_group(process: subprocess.Popen, sig=signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    process.wait(timeout=60)


def wait_for(predicate, process, timeout=120.0, interval=0.005):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if process.poll() is not None:
            output = process.stdout.read().decode(errors="replace")
            raise AssertionError(f"run ended before the kill point:\n{output[-3000:]}")
        time.sleep(interval)
    return False


def kill_when(predicate, process, timeout=120.0, interval=0.05) -> None:
    """SIGKILL ``process``'s group at a moment ``predicate`` holds: the group is stopped
    (SIGSTOP) and ``predicate`` asked again before the kill, so that the run cannot move
    past that moment (commit its next checkpoint) between the check and the kill."""
    deadline = time.time() + timeout
    while True:
        assert wait_for(
            predicate, process, timeout=max(deadline - time.time(), 0), interval=interval
        )
        os.killpg(process.pid, signal.SIGSTOP)
        if predicate():
            stop_group(process)
            return
        os.killpg(process.pid, signal.SIGCONT)


def finish(cfg, env, tmp_path):
    process = start(cfg, env, tmp_path)
    try:
        output, _ = process.communicate(timeout=300)
    finally:
        stop_group(process)
    assert process.returncode == 0, output.decode(errors="replace")[-3000:]
    return output.decode(errors="replace")


def kill_mid_checkpoint_write(cfg: dict, env: dict[str, str], tmp_path: Path) -> None:
    """Start ``baton run`` on ``cfg``, SIGKILL it while a checkpoint file is being
    written, and check that every checkpoint committed by then is whole."""
    folder = Path(cfg["work_dir"]) / cfg["experiment_name"] / "checkpoints"

    def writing():
        return folder.exists() and any(p.name.endswith(".tmp") for p in folder.iterdir())

    process = start(cfg, env, tmp_path)
    try:
        assert wait_for(writing, process, interval=0.001), "never caught a checkpoint being written"
    finally:
        stop_group(process)
    store = CheckpointStore(folder.parent)
    for ref in store.list():
        store.verify(ref)  # every committed checkpoint is whole


def final_checkpoint(cfg: dict) -> dict:
    store = CheckpointStore(f"{cfg['work_dir']}/{cfg['experiment_name']}")
    ref = store.latest()
    assert ref is not None, "no checkpoint"
    return torch.load(ref.uri, weights_only=True)


def assert_same_training_result(a: dict, b: dict) -> None:
    """Weights, optimizer state and schedulers bitwise equal."""
    assert a["meta"]["iter"] == b["meta"]["iter"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            other = b["optimizer"]["state"][pid][name]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["param_schedulers"] == b["param_schedulers"]


def flaky(tmp_path: Path, failures: int, fail_at: int = 13) -> dict:
    """A model that fails ``failures`` times at iteration ``fail_at`` (default: inside
    epoch 2, 8 iterations per epoch), counting in ``tmp_path/budget``."""
    return {
        "type": "tests.faults.FlakyMLP",
        "in_features": 8,
        "num_classes": 3,
        "hidden": [16],
        "dropout": 0.2,
        "fail_at": fail_at,
        "failures": failures,
        "budget": str(tmp_path / "budget"),
    }
