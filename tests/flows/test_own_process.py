"""A flow's run on one device trains in a process forked from the flow's
(baton.run.own_process): the same result, its log lines in the run's log, no process
left behind, and training in the flow's process where a fork is not safe."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from baton.config import validate
from baton.errors import ConfigError
from baton.flows.train import train_pipeline
from baton.run import pipeline as pl

from ..faults import forwards_so_far
from ..processes import alive
from .conftest import small_config
from .helpers import (
    ROOT,
    assert_same_training_result,
    final_checkpoint,
    run_env,
    start,
    stop_group,
    wait_for,
)
from .test_kill_and_resume import slow_model

pytestmark = pytest.mark.integration

FORKED = re.compile(r"training in process (\d+), forked from this one")


def run_log(cfg: dict) -> str:
    runs = Path(cfg["work_dir"]) / cfg["experiment_name"] / "runs"
    return "".join(p.read_text() for p in runs.rglob("*.log")) if runs.is_dir() else ""


def reference(tmp_path: Path) -> dict:
    cfg = small_config(tmp_path / "reference", name="own")
    pl.run(validate(cfg))
    return final_checkpoint(cfg)


def test_a_flow_trains_in_a_forked_process_and_ends_as_a_plain_run(prefect_harness, tmp_path):
    cfg = small_config(tmp_path / "flow", name="own")
    assert train_pipeline(config=cfg, return_state=True).is_completed()
    log = run_log(cfg)
    pids = {int(pid) for pid in FORKED.findall(log)}
    assert pids and os.getpid() not in pids, log[-3000:]
    assert all(not alive(pid) for pid in pids), "a training process outlived its flow run"
    # the engine's records, emitted in the training process, reach the run's log
    assert "saved checkpoint" in log and "epoch_0004.pth" in log
    assert_same_training_result(reference(tmp_path), final_checkpoint(cfg))


def test_where_the_operator_says_so_the_flow_trains_in_its_own_process(
    prefect_harness, tmp_path, monkeypatch
):
    # the same path as a fork found unsafe (not Linux, CUDA used, OpenMP workers running)
    monkeypatch.setenv("BATON_TRAINING_PROCESS", "flow")
    cfg = small_config(tmp_path / "flow", name="own")
    assert train_pipeline(config=cfg, return_state=True).is_completed()
    log = run_log(cfg)
    assert "training in this process: the operator's BATON_TRAINING_PROCESS=flow" in log
    assert not FORKED.search(log)
    assert_same_training_result(reference(tmp_path), final_checkpoint(cfg))


def test_an_unknown_training_process_setting_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("BATON_TRAINING_PROCESS", "thread")
    with pytest.raises(ConfigError, match=r"^BATON_TRAINING_PROCESS is 'thread': set it to "):
        pl.fork_refused()
    for default in ("fork", ""):  # set empty, as to unset it: the default, where it is safe
        monkeypatch.setenv("BATON_TRAINING_PROCESS", default)
        assert "BATON_TRAINING_PROCESS" not in (pl.fork_refused() or "")


PROBE = """
import sys, torch
from baton.run.own_process import ForkRefused, TrainingProcess
torch.set_num_threads(int(sys.argv[1]))
torch.ones(2**22).sum()  # on several threads: torch's OpenMP workers start
group = TrainingProcess()
try:
    group.start()
except ForkRefused as err:
    print("refused:", err, group.pid)
else:
    pid = group.pid
    group.close()
    print("forked", pid)
"""


@pytest.mark.parametrize("threads", [1, 2])
def test_openmp_workers_refuse_the_fork_and_the_child_is_stopped(threads):
    # A fresh interpreter: the workers would stay in this one for the rest of the session.
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(threads)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr
    words = out.stdout.split()
    if threads == 1:
        assert words[0] == "forked" and not alive(int(words[1]))
    else:  # the child was made, found unsafe, stopped and reaped
        assert out.stdout.startswith("refused:") and "OpenMP" in out.stdout, out.stdout
        assert words[-1] == "None"


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory):
    return run_env(tmp_path_factory.mktemp("prefect_home"))


@pytest.mark.slow
def test_a_sigkill_of_the_flow_process_alone_ends_its_training_process(tmp_path, prefect_env):
    progress = tmp_path / "forwards"
    model = {**slow_model(delay=0.02), "progress": str(progress)}
    cfg = small_config(tmp_path / "killed", name="own", model=model)
    process = start(cfg, prefect_env, tmp_path)
    try:
        assert wait_for(lambda: forwards_so_far(progress) >= 3, process)
        (pid,) = {int(p) for p in FORKED.findall(run_log(cfg))}
        assert alive(pid)
        os.kill(process.pid, signal.SIGKILL)  # the flow's process only, not its group
        process.wait(timeout=30)
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not alive(pid), "the training process outlived the flow's process"
        before = forwards_so_far(progress)
        time.sleep(0.3)
        assert forwards_so_far(progress) == before, "training went on"
    finally:
        stop_group(process)


def test_a_training_process_killed_mid_epoch_is_retried_and_the_run_stays_exact(
    prefect_harness, tmp_path
):
    budget = tmp_path / "deaths"
    model = {"type": "tests.faults.DyingMLP", "in_features": 8, "num_classes": 3}
    model |= {"hidden": [16], "die_at": 12, "budget": str(budget)}  # in epoch 2
    cfg = small_config(tmp_path / "flow", name="own", model=model)
    state = train_pipeline(config=cfg, return_state=True)
    assert state.is_completed() and budget.read_text() == "1"
    log = run_log(cfg)
    assert "a training process died" in log and "rebuilt the pipeline" in log, log[-3000:]
    assert len(set(FORKED.findall(log))) == 2  # the first, and the retry's
    reference_cfg = small_config(tmp_path / "reference", name="own", model=model)
    pl.run(validate(reference_cfg))  # its budget is spent: it does not die
    assert_same_training_result(final_checkpoint(reference_cfg), final_checkpoint(cfg))


def test_the_progress_bar_of_a_forked_run_ends_full(tmp_path, monkeypatch, capfd):
    # the training process reports at most every 0.5 s, its running loss with each: an
    # epoch shorter than that ends with one last report, so the bar is full and ended
    from baton import tasks
    from baton.tasks.state import config_of, forget, live_pipeline

    monkeypatch.setenv("BATON_PROGRESS", "1")
    config = small_config(tmp_path / "bar", name="bar")
    state = tasks.prepare.fn(config, tasks.find_resume_point.fn(config))
    try:
        pipeline, _ = live_pipeline(config_of(config), state)
        assert "forked from this one" in pipeline.trains_in
        tasks.train_epoch.fn(config, state, 1)
    finally:
        forget(config_of(config))
    bar = capfd.readouterr().err
    assert "loss nan" not in bar  # the running loss comes with every report
    assert bar.count("\n") == 1 and bar.count("8/8") == 1  # the full bar, drawn once
    assert re.search(r"\repoch 1/\d+ \[#{30}\] 8/8 loss \d+\.\d{4}\n", bar), bar


def test_the_progress_bar_ends_its_line_once_where_an_epoch_stops(monkeypatch, capsys):
    from types import SimpleNamespace

    from baton.tasks.train import _progress_printer

    monkeypatch.setenv("BATON_PROGRESS", "1")
    show = _progress_printer(SimpleNamespace(epoch_length=8, max_epochs=4), 2)
    show({"loss": 0.5}, 3)
    show({}, 5, final=True)  # a stop: no metrics come with it; the last loss stays shown
    show({"loss": 0.1}, 8)  # nothing after the line ended
    bar = capsys.readouterr().err
    assert bar.endswith("5/8 loss 0.5000\n") and bar.count("\n") == 1, repr(bar)
