"""The seed API: signatures, constructor, properties, logging, auto_scale_lr."""

import inspect
import logging
import subprocess
import sys

import pytest
import torch
from torch import nn

from baton import SingleDeviceStrategy
from baton.checkpoint.store import RetentionPolicy
from baton.optim import OptimWrapper
from baton.optim.schedulers import LinearLR

SEED_SIGNATURES = {
    "__init__": (
        "(self, *, work_dir='work_dirs', experiment_name=None, env_kwargs=None, "
        "log_kwargs=None, auto_scale_lr=None)"
    ),
    "convert_model": "(self, model)",
    "load_checkpoint": (
        "(self, filename, *, map_location='cpu', strict=False, "
        "revise_keys=[('^module\\\\.', '')], callback=None)"
    ),
    "prepare": (
        "(self, model, *, optim_wrapper=None, param_scheduler=None, compile=False, "
        "dispatch_kwargs=None)"
    ),
    "resume": (
        "(self, filename, *, resume_optimizer=True, resume_param_scheduler=True, "
        "map_location='default', callback=None)"
    ),
    "save_checkpoint": (
        "(self, filename, *, save_optimizer=True, save_param_scheduler=True, "
        "extra_ckpt=None, callback=None)"
    ),
}


def _plain_signature(func) -> str:
    sig = inspect.signature(func)
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


@pytest.mark.parametrize("name", sorted(SEED_SIGNATURES))
def test_signatures_match_the_seed_api(name):
    assert _plain_signature(getattr(SingleDeviceStrategy, name)) == SEED_SIGNATURES[name]


@pytest.mark.mmengine
@pytest.mark.parametrize("name", sorted(SEED_SIGNATURES))
def test_signatures_match_mmengine_keyword_for_keyword(name):
    mm = pytest.importorskip("mmengine._strategy").SingleDeviceStrategy
    ours = inspect.signature(getattr(SingleDeviceStrategy, name)).parameters
    theirs = inspect.signature(getattr(mm, name)).parameters
    assert list(ours) == list(theirs)
    for key in ours:
        assert ours[key].kind == theirs[key].kind
        if key != "revise_keys":  # ours escapes the dot: r'^module\.' (theirs: r'^module.')
            assert ours[key].default == theirs[key].default


def test_constructor_creates_nothing_on_disk(work_dir):
    strategy = SingleDeviceStrategy(work_dir=str(work_dir), experiment_name="quiet")
    assert not work_dir.exists()
    assert strategy.work_dir == str(work_dir.absolute())
    assert strategy.experiment_name == "quiet"  # no timestamp appended
    assert strategy.log_dir.startswith(str(work_dir / "quiet" / "runs"))
    assert (strategy.rank, strategy.world_size, strategy.distributed) == (0, 1, False)


def test_experiment_name_defaults_to_timestamp(work_dir):
    strategy = SingleDeviceStrategy(work_dir=str(work_dir))
    assert strategy.experiment_name == strategy.timestamp


@pytest.mark.parametrize("bad", ["../escape", "a/b", "..", "", ".hidden", "x" * 200, "a\\b"])
def test_unsafe_experiment_names_are_refused(work_dir, bad):
    with pytest.raises(ValueError, match="experiment_name .* is not allowed"):
        SingleDeviceStrategy(work_dir=str(work_dir), experiment_name=bad)


def test_unknown_env_key_lists_accepted_ones(work_dir):
    with pytest.raises(TypeError, match=r"unknown key\(s\) \['launcher_typo'\].*randomness"):
        SingleDeviceStrategy(work_dir=str(work_dir), env_kwargs={"launcher_typo": 1})


def test_unknown_randomness_key(work_dir):
    with pytest.raises(TypeError, match=r"randomness got unknown key\(s\) \['sed'\]"):
        SingleDeviceStrategy(work_dir=str(work_dir), env_kwargs={"randomness": {"sed": 1}})


def test_unknown_log_key(work_dir):
    with pytest.raises(TypeError, match=r"log_kwargs got unknown key\(s\) \['level'\]"):
        SingleDeviceStrategy(work_dir=str(work_dir), log_kwargs={"level": "INFO"})


def test_env_kwargs_accepts_every_documented_key(work_dir):
    env = {
        "randomness": {"seed": 3, "deterministic": True, "diff_rank_seed": False},
        "cudnn_benchmark": False,
        "dist_cfg": {},
        "resource_limit": 1024,
    }
    strategy = SingleDeviceStrategy(work_dir=str(work_dir), env_kwargs=env)
    assert strategy.seed == 3
    assert torch.are_deterministic_algorithms_enabled()


MP_CFG = """
import multiprocessing, sys, warnings
import cv2
from baton import SingleDeviceStrategy
multiprocessing.set_start_method("fork")
mp_cfg = {"mp_start_method": "spawn", "opencv_num_threads": 1}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    SingleDeviceStrategy(work_dir=sys.argv[1], env_kwargs={"mp_cfg": mp_cfg})
print(multiprocessing.get_start_method(), cv2.getNumThreads(), len(caught))
"""


def test_mp_cfg_is_applied_as_mmengine_applies_it(work_dir):
    # in a process of its own: the start method is global to the process
    pytest.importorskip("cv2")
    result = subprocess.run(
        [sys.executable, "-c", MP_CFG, str(work_dir)], capture_output=True, text=True, check=True
    )
    # forced to spawn, with mmengine's warning that it changed; OpenCV down to one thread
    assert result.stdout.split() == ["spawn", "1", "1"], result.stderr


def test_mp_cfg_unknown_key(work_dir):
    with pytest.raises(TypeError, match=r"mp_cfg got unknown key\(s\) \['start'\]"):
        SingleDeviceStrategy(work_dir=str(work_dir), env_kwargs={"mp_cfg": {"start": "fork"}})


def test_dist_cfg_is_refused_not_ignored(work_dir):
    # one device in one process: a distributed launch setting would do nothing
    with pytest.raises(ValueError, match=r"dist_cfg.*remove dist_cfg"):
        SingleDeviceStrategy(work_dir=str(work_dir), env_kwargs={"dist_cfg": {"backend": "nccl"}})


def test_none_seed_is_drawn_and_recorded(work_dir):
    a = SingleDeviceStrategy(work_dir=str(work_dir))
    b = SingleDeviceStrategy(work_dir=str(work_dir))
    assert isinstance(a.seed, int) and a.randomness["seed"] == a.seed
    assert a.seed != b.seed


def test_seed_reproduces_torch_random_numbers(work_dir):
    SingleDeviceStrategy(work_dir=str(work_dir), env_kwargs={"randomness": {"seed": 42}})
    first = torch.rand(3)
    SingleDeviceStrategy(work_dir=str(work_dir), env_kwargs={"randomness": {"seed": 42}})
    assert torch.equal(first, torch.rand(3))


def test_env_kwargs_is_not_mutated_and_not_shared(work_dir, tiny_net):
    env = {"randomness": {"seed": 1}}
    strategy = SingleDeviceStrategy(work_dir=str(work_dir), experiment_name="a", env_kwargs=env)
    strategy.prepare(tiny_net)
    ref = strategy.save_checkpoint("epoch_0001.pth", extra_ckpt={"meta": {"seed": 999}})
    other = SingleDeviceStrategy(work_dir=str(work_dir), experiment_name="b", env_kwargs=env)
    other.prepare(nn.Linear(8, 16))
    assert env == {"randomness": {"seed": 1}}
    # a resume that adopts the checkpoint's seed does not leak into later strategies
    resumer = SingleDeviceStrategy(work_dir=str(work_dir), experiment_name="c")
    resumer.prepare(type(tiny_net)())
    resumer.resume(ref.uri)
    later = SingleDeviceStrategy(work_dir=str(work_dir), experiment_name="d")
    assert later.randomness["seed"] != resumer.seed


def test_each_strategy_logs_to_its_own_file(work_dir, tiny_net):
    a = SingleDeviceStrategy(work_dir=str(work_dir), experiment_name="a")
    b = SingleDeviceStrategy(
        work_dir=str(work_dir), experiment_name="b", log_kwargs={"log_level": "WARNING"}
    )
    assert a.logger is not b.logger
    a.logger.info("from a")
    b.logger.info("from b, filtered by level")
    b.logger.warning("warning from b")
    a_log = (work_dir / "a" / "runs").rglob("*.log")
    b_log = (work_dir / "b" / "runs").rglob("*.log")
    a_text = "".join(p.read_text() for p in a_log)
    b_text = "".join(p.read_text() for p in b_log)
    assert "from a" in a_text and "from b" not in a_text
    assert "warning from b" in b_text and "filtered" not in b_text
    assert b.logger.level == logging.WARNING and a.logger.level == logging.INFO


def test_log_file_can_be_chosen(work_dir, tmp_path):
    target = tmp_path / "logs" / "run.log"
    strategy = SingleDeviceStrategy(work_dir=str(work_dir), log_kwargs={"log_file": str(target)})
    strategy.logger.info("hello")
    assert "hello" in target.read_text()


def _sgd(model, lr=0.1):
    return torch.optim.SGD(model.parameters(), lr=lr)


def test_auto_scale_lr_scales_by_batch_ratio(work_dir, tiny_net):
    strategy = SingleDeviceStrategy(
        work_dir=str(work_dir), auto_scale_lr={"enable": True, "base_batch_size": 64}
    )
    _, wrapper = strategy.prepare(
        tiny_net,
        optim_wrapper={"optimizer": {"type": "SGD", "lr": 0.1}},
        dispatch_kwargs={"train_micro_batch_size_per_gpu": 16},
    )
    assert wrapper.get_lr()["lr"] == [pytest.approx(0.025)]


def test_auto_scale_lr_fixes_schedulers_built_before(work_dir, tiny_net):
    strategy = SingleDeviceStrategy(
        work_dir=str(work_dir), auto_scale_lr={"enable": True, "base_batch_size": 32}
    )
    wrapper = OptimWrapper(_sgd(tiny_net, lr=0.1))
    warmup = LinearLR(wrapper, start_factor=0.5, by_epoch=False, end=3)
    strategy.prepare(
        tiny_net,
        optim_wrapper=wrapper,
        param_scheduler=[warmup],
        dispatch_kwargs={"train_micro_batch_size_per_gpu": 64},
    )
    assert wrapper.get_lr()["lr"] == [pytest.approx(0.1)]  # 0.1 * 0.5 * 2
    assert warmup.base_values == [pytest.approx(0.2)]
    for _ in range(3):
        warmup.step()
    assert wrapper.get_lr()["lr"] == [pytest.approx(0.2)]


def test_auto_scale_lr_needs_the_batch_size(work_dir, tiny_net):
    strategy = SingleDeviceStrategy(
        work_dir=str(work_dir), auto_scale_lr={"enable": True, "base_batch_size": 32}
    )
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu"):
        strategy.prepare(tiny_net, optim_wrapper={"optimizer": {"type": "SGD", "lr": 0.1}})


def test_auto_scale_lr_needs_base_batch_size(work_dir):
    with pytest.raises(ValueError, match="base_batch_size"):
        SingleDeviceStrategy(work_dir=str(work_dir), auto_scale_lr={"enable": True})


def test_auto_scale_lr_disabled_changes_nothing(work_dir, tiny_net):
    strategy = SingleDeviceStrategy(
        work_dir=str(work_dir), auto_scale_lr={"enable": False, "base_batch_size": 32}
    )
    _, wrapper = strategy.prepare(tiny_net, optim_wrapper={"optimizer": {"type": "SGD", "lr": 0.1}})
    assert wrapper.get_lr()["lr"] == [0.1]


def test_deterministic_mode_does_not_load_the_compiler_until_a_model_is_compiled(tmp_path):
    # A fresh interpreter: importing torch._inductor costs 1.5 s in every new process.
    script = """
import sys, torch
from torch import nn
from baton import SingleDeviceStrategy
strategy = SingleDeviceStrategy(work_dir=sys.argv[1], env_kwargs={"randomness": {"seed": 1, "deterministic": True}})
assert torch.are_deterministic_algorithms_enabled()
assert "torch._inductor.config" not in sys.modules
strategy.prepare(nn.Linear(2, 2), compile=True)
import torch._inductor.config as inductor_config
assert inductor_config.deterministic is True
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_retention_is_the_experiments_and_can_be_set(work_dir):
    strategy = SingleDeviceStrategy(work_dir=str(work_dir), experiment_name="kept")
    assert strategy.retention.keep_last is None  # every checkpoint, as mmengine keeps them
    strategy.retention = RetentionPolicy(keep_last=2)
    assert strategy.checkpoints.retention == strategy.experiment.retention
    assert strategy.checkpoints.retention.keep_last == 2
