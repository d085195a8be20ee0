"""The environment fingerprint: in every checkpoint, compared on resume, shown by inspect."""

import json
import logging

import pytest
import torch

from baton.checkpoint import io
from baton.engine import fingerprint
from baton.flows.cli import main

from .helpers import EPOCH_LENGTH, make_strategy, mlp

FIELDS = {
    "torch",
    "build",
    "cudnn",
    "device",
    "cpu_capability",
    "cpu_threads",
    "deterministic",
    "python",
    "numpy",
    "baton",
    "config_hash",
    "world_size",
}


def prepared(work_dir):
    strategy = make_strategy(work_dir)
    strategy.config_hash = "c0ffee"
    strategy.prepare(
        mlp(),
        optim_wrapper={"optimizer": {"type": "SGD", "lr": 0.1}},
        dispatch_kwargs={"max_epochs": 1, "max_iters": EPOCH_LENGTH, "epoch_length": EPOCH_LENGTH},
    )
    return strategy


def rewrite_environment(path, **changes):
    checkpoint = io.load(str(path))
    if changes.get("drop"):
        del checkpoint["meta"]["environment"]
    else:
        checkpoint["meta"]["environment"].update(changes)
    torch.save(checkpoint, path)


def test_every_checkpoint_carries_the_fingerprint(work_dir):
    ref = prepared(work_dir).save_checkpoint("epoch_0001.pth")
    env = io.load(ref.uri)["meta"]["environment"]
    assert set(env) == FIELDS
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    assert env["config_hash"] == "c0ffee" and env["world_size"] == 1
    assert env["deterministic"]["algorithms"] is True  # make_strategy asks for it
    assert env["build"] == ("cpu" if torch.version.cuda is None else f"cuda {torch.version.cuda}")


def test_world_size_is_a_parameter():
    cpu = torch.device("cpu")
    assert fingerprint.environment_fingerprint(cpu, config_hash=None)["world_size"] == 1
    fp = fingerprint.environment_fingerprint(cpu, config_hash=None, world_size=4)
    assert fp["world_size"] == 4


def test_a_resume_in_another_environment_warns_naming_what_changed(work_dir, caplog):
    ref = prepared(work_dir).save_checkpoint("epoch_0001.pth")
    rewrite_environment(ref.uri, torch="1.13.1", world_size=2, baton="0.0.9")
    with caplog.at_level(logging.WARNING, logger="baton"):
        prepared(work_dir).resume(ref.uri)
    warned = [r.getMessage() for r in caplog.records if "another environment" in r.getMessage()]
    assert len(warned) == 1
    assert f"torch: 1.13.1 -> {torch.__version__}" in warned[0]
    assert "world_size: 2 -> 1" in warned[0]
    assert "baton" not in warned[0].split(":", 1)[1].split("(")[0]  # informative only


def test_informative_changes_do_not_warn(work_dir, caplog):
    ref = prepared(work_dir).save_checkpoint("epoch_0001.pth")
    rewrite_environment(ref.uri, baton="0.0.9", numpy="1.0", config_hash="other")
    # cuDNN switches change nothing on the CPU
    rewrite_environment(
        ref.uri,
        deterministic={**fingerprint._deterministic(), "algorithms": True, "cudnn_benchmark": True},
    )
    with caplog.at_level(logging.WARNING, logger="baton"):
        prepared(work_dir).resume(ref.uri)
    assert not [r for r in caplog.records if "another environment" in r.getMessage()]


def test_a_checkpoint_without_a_fingerprint_still_resumes(work_dir, caplog):
    ref = prepared(work_dir).save_checkpoint("epoch_0001.pth")
    rewrite_environment(ref.uri, drop=True)
    strategy = prepared(work_dir)
    with caplog.at_level(logging.WARNING, logger="baton"):
        strategy.resume(ref.uri)
    assert strategy.iter == 0
    assert not [r for r in caplog.records if "another environment" in r.getMessage()]
    assert fingerprint.fingerprint_changes(None, strategy.environment_fingerprint()) is None


def test_changes_are_classified():
    current = fingerprint.environment_fingerprint(torch.device("cpu"), config_hash="a")
    saved = {**current, "cpu_capability": "AVX2", "python": "3.10.0", "numpy": "0.1"}
    changes = fingerprint.fingerprint_changes(saved, current)
    assert {c.field for c in changes} == {"cpu_capability", "python", "numpy"}
    patch = {**current, "python": current["python"].rsplit(".", 1)[0] + ".99"}
    assert fingerprint.fingerprint_changes(patch, current) == []  # a patch release
    assert [c.field for c in fingerprint.breaking(changes)] == ["cpu_capability", "python"]
    assert "instruction set" in fingerprint.describe(fingerprint.breaking(changes))


def test_the_cpu_thread_count_is_compared_only_where_the_cpu_trains(work_dir, caplog):
    ref = prepared(work_dir).save_checkpoint("epoch_0001.pth")
    assert io.load(ref.uri)["meta"]["environment"]["cpu_threads"] == torch.get_num_threads()
    rewrite_environment(ref.uri, cpu_threads=torch.get_num_threads() + 3)
    with caplog.at_level(logging.WARNING, logger="baton"):
        prepared(work_dir).resume(ref.uri)
    warned = [r.getMessage() for r in caplog.records if "another environment" in r.getMessage()]
    threads = torch.get_num_threads()
    assert len(warned) == 1 and f"cpu_threads: {threads + 3} -> {threads}" in warned[0]
    assert "OMP_NUM_THREADS" in warned[0]  # what to look at

    on_gpu = fingerprint.environment_fingerprint(torch.device("cpu"), config_hash="a")
    on_gpu["device"] = "NVIDIA H100 80GB HBM3"
    assert fingerprint.fingerprint_changes({**on_gpu, "cpu_threads": 64}, on_gpu) == []


@pytest.mark.parametrize("drop", [False, True], ids=["recorded", "old-checkpoint"])
def test_inspect_shows_the_fingerprint(work_dir, capsys, drop):
    ref = prepared(work_dir).save_checkpoint("epoch_0001.pth")
    if drop:
        rewrite_environment(ref.uri, drop=True)
    assert main(["ckpt", "inspect", ref.uri]) == 0
    summary = json.loads(capsys.readouterr().out)
    if drop:
        assert summary["environment"].startswith("none recorded")
    else:
        assert set(summary["environment"]) == FIELDS and "environment" not in summary["meta"]
