"""The operator's quotas: a run asking for too many parameters, iterations, loader workers,
checkpoint files or bytes, or the last free disk, is refused before the work, naming the
quota and where an operator raises it; a refused save writes nothing."""

import os
import resource
import tracemalloc
from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest
import torch
from prefect.client.schemas.objects import FlowRun
from torch import nn

from baton.config import load_config
from baton.errors import ConfigError, QuotaError, UntrustedInputError
from baton.flows.pool import check_this_run
from baton.randomness import cpu_rng_states, set_cpu_rng_states
from baton.run import pipeline as pl
from baton.tasks._common import PERMANENT_ERRORS
from baton.trust import Trust
from baton.trust.quotas import Quotas, count_parameters, has_lazy_parameters

from ..baton.helpers import make_strategy, mlp, small_pipeline
from ..baton.image_folders import make_image_folder

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
WHERE = r"or an operator raises it with BATON_MAX_PARAMETERS in the worker's environment"


def _problems(err: pytest.ExceptionInfo) -> dict[str, str]:
    return {p.path: p.message for p in err.value.problems}


# --- at validation --------------------------------------------------------------------


def test_a_terabyte_mlp_is_refused_at_validation_in_little_memory():
    config = ROOT / "configs" / "digits_mlp.yaml"
    load_config(config)  # imports and caches warmed up: what follows is the model's cost
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as err:
            load_config(config, ["model.hidden=[4000000000]"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    message = _problems(err)["model"]
    assert "model has 300,000,000,010 parameters, more than the quota of" in message
    assert "(max_parameters); use a smaller model, " + WHERE.replace("\\", "") in message
    assert "max_parameters under [tool.baton.quotas] in pyproject.toml" in message
    # the checkpoints such a model would write are refused in the same error
    assert "max_experiment_bytes" in _problems(err)["checkpoint"]
    assert peak < 16 << 20, f"{peak} bytes traced to refuse it"
    assert grown_kib < 256 << 10, f"peak memory grew by {grown_kib} KiB"


def test_an_embedding_of_ten_billion_rows_is_refused_at_validation(tmp_path):
    model = {"type": "Embedding", "num_embeddings": 10_000_000_000, "embedding_dim": 8}
    with pytest.raises(ConfigError) as err:
        load_config(small_pipeline(tmp_path, model=model))
    assert "model has 80,000,000,000 parameters" in _problems(err)["model"]


def test_a_loss_with_ten_billion_parameters_is_refused_at_validation(tmp_path):
    """A loss is a module as well, built on the device when the pipeline is built."""
    cfg = small_pipeline(tmp_path)
    cfg["loss"] = {"type": "torch.nn.Embedding", "num_embeddings": 10**10, "embedding_dim": 16}
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert "loss has 160,000,000,000 parameters" in _problems(err)["loss"]


def test_a_synthetic_dataset_is_bounded_at_validation(tmp_path):
    cfg = small_pipeline(tmp_path)
    cfg["train_data"]["dataset"] = {
        "type": "SyntheticClassification",
        "num_samples": 10**18,
        "num_features": 10**6,
    }
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    problems = _problems(err)
    assert {"train_data.dataset.num_samples", "train_data.dataset.num_features"} <= set(problems)


def test_the_parameters_quota_comes_from_the_environment(tmp_path, monkeypatch):
    cfg = small_pipeline(tmp_path)  # 195 parameters
    monkeypatch.setenv("BATON_MAX_PARAMETERS", "194")
    with pytest.raises(ConfigError, match=r"model has 195 parameters, more than the quota of 194"):
        load_config(cfg)
    monkeypatch.setenv("BATON_MAX_PARAMETERS", "195")
    load_config(cfg)


def test_every_problem_is_reported_with_the_quotas(tmp_path):
    model = {"type": "Embedding", "num_embeddings": 10_000_000_000, "embedding_dim": 8}
    cfg = small_pipeline(tmp_path, model=model)
    cfg["checkpoint"] = {"keep_last": None, "interval_iters": 1, "best_metric": "nope"}
    cfg["train"] = {"max_iters": 20_000_000}
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    problems = _problems(err)
    assert "max_parameters" in problems["model"]
    assert "max_iterations" in problems["train.max_iters"]
    assert "max_experiment_files" in problems["checkpoint.keep_last"]
    assert "must start with" in problems["checkpoint.best_metric"]


def test_lazy_parameters_are_counted_on_the_meta_device_when_the_pipeline_is_built(
    tmp_path, monkeypatch
):
    # LazyLinear(8 -> 3) has 27 parameters, unknown until data reaches it
    monkeypatch.setenv("BATON_MAX_PARAMETERS", "20")
    cfg = load_config(small_pipeline(tmp_path, model={"type": "LazyLinear", "out_features": 3}))
    with pytest.raises(QuotaError, match=r"model has 27 parameters.*counted on the meta device"):
        pl.build_pipeline(cfg)
    monkeypatch.setenv("BATON_MAX_PARAMETERS", "27")
    pipeline = pl.build_pipeline(cfg)
    assert has_lazy_parameters(pipeline.strategy.model)  # the real model is still lazy
    pl.train_one_epoch(pipeline)
    assert pipeline.strategy.model.weight.shape == (3, 8)


def test_the_checkpoint_plan_counts_the_lazy_parameters_once_sized(tmp_path, monkeypatch):
    # 4 checkpoints of 64 KiB each without the 27 lazy parameters (262,144 bytes), of
    # 64 KiB + 27 * 4 * 3 bytes with them (263,440 bytes)
    monkeypatch.setenv("BATON_MAX_EXPERIMENT_BYTES", "263000")
    cfg = load_config(small_pipeline(tmp_path, model={"type": "LazyLinear", "out_features": 3}))
    with pytest.raises(QuotaError, match=r"4 files of about 65,860 bytes each.*max_experiment"):
        pl.build_pipeline(cfg)


def test_lazy_parameters_of_a_model_that_fails_on_meta_are_counted_after_their_first_forward(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("BATON_ALLOWED_MODULES", "tests")
    monkeypatch.setenv("BATON_MAX_PARAMETERS", "20")
    model = {"type": "tests.security.lazy_models.GatedLazyLinear", "out_features": 3}
    pipeline = pl.build_pipeline(load_config(small_pipeline(tmp_path, model=model)))
    with pytest.raises(QuotaError, match=r"model has 27 parameters.*lazy parameters were set"):
        pl.train_one_epoch(pipeline)
    assert pipeline.strategy.iter == 0
    assert pipeline.experiment.store.list() == []


def test_the_meta_dry_run_leaves_the_model_and_every_rng_state_as_they_were(tmp_path):
    def lazy_model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Dropout(0.5), nn.LazyLinear(3))

    model, twin = lazy_model(), lazy_model()
    states = cpu_rng_states()
    counted = Quotas.from_environment(folder=tmp_path).check_model(
        model, example_input=torch.empty(4, 8, device="meta")
    )
    assert counted[1].weight.device.type == "meta" and count_parameters(counted) == 27
    assert has_lazy_parameters(model)
    after = cpu_rng_states()
    assert after[0] == states[0] and torch.equal(after[2], states[2])
    assert all(np.array_equal(a, b) for a, b in zip(after[1], states[1], strict=True))
    # the real materialization draws what it would have drawn without the dry run
    inputs = torch.ones(4, 8)
    first = model(inputs)
    set_cpu_rng_states(states)
    assert torch.equal(first, twin(inputs)) and torch.equal(model[1].weight, twin[1].weight)


def small_cnn_on_images(work_dir: Path, num_classes: int) -> dict:
    """SmallCNN, whose head is a LazyLinear, on an image folder of 12x12 grayscale PNGs."""
    cfg = small_pipeline(work_dir)
    cfg["model"] = {"type": "SmallCNN", "num_classes": num_classes, "channels": 4, "image_size": 12}
    folder = make_image_folder(work_dir / "images" / "train")
    dataset = {"type": "ImageFolder", "root": str(folder), "mode": "L"}
    cfg["train_data"] = {"dataset": dataset, "batch_size": 8}
    del cfg["val_data"]
    return cfg


def test_lazy_parameters_over_the_quota_are_refused_before_anything_is_allocated(tmp_path):
    # 4e9 classes from 288 features: 1,156,000,000,000 parameters, 4.6 TB of weights, all
    # in the LazyLinear that only the first forward pass would materialize
    cfg = load_config(small_cnn_on_images(tmp_path, 4_000_000_000))
    pl.build_pipeline(load_config(small_cnn_on_images(tmp_path, 3)))  # warm imports, caches
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(QuotaError) as err:
        pl.build_pipeline(cfg)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    message = str(err.value)
    assert "model has 1,156,000,000,386 parameters, more than the quota of" in message
    assert "(max_parameters); use a smaller model, " + WHERE.replace("\\", "") in message
    assert "lazy parameters counted on the meta device" in message
    assert isinstance(err.value, PERMANENT_ERRORS)
    assert grown_kib < 256 << 10, f"peak memory grew by {grown_kib} KiB"
    assert not (tmp_path / "exp").exists()  # no experiment folder, no checkpoint


def test_loader_workers_are_at_most_the_quota(tmp_path, monkeypatch):
    cfg = small_pipeline(tmp_path)
    cfg["train_data"]["num_workers"] = 3
    cfg["val_data"]["num_workers"] = 2
    monkeypatch.setenv("BATON_MAX_WORKERS", "2")
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert _problems(err).keys() == {"train_data.num_workers"}
    assert (
        "3 loader workers, more than the quota of 2 (max_workers); use fewer, or an "
        "operator raises it with BATON_MAX_WORKERS" in _problems(err)["train_data.num_workers"]
    )


def test_training_processes_are_at_most_the_quota(tmp_path, monkeypatch):
    cfg = small_pipeline(tmp_path)
    cfg["launcher"] = {"nproc": 3}
    monkeypatch.setenv("BATON_MAX_PROCESSES", "2")
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert _problems(err).keys() == {"launcher.nproc"}
    assert (
        "3 training processes, more than the quota of 2 (max_processes); use fewer, or an "
        "operator raises it with BATON_MAX_PROCESSES" in _problems(err)["launcher.nproc"]
    )
    assert not (tmp_path / "exp").exists()


def test_a_runs_nproc_setting_is_bounded_by_the_quota_too(tmp_path, monkeypatch):
    from baton.config import run_settings

    monkeypatch.setenv("BATON_MAX_PROCESSES", "2")
    with pytest.raises(ConfigError, match="launcher.nproc"):
        load_config(small_pipeline(tmp_path), run_settings(None, nproc=64))


def test_the_default_processes_quota_is_the_gpus_or_the_cores(tmp_path):
    cores = len(os.sched_getaffinity(0))
    cfg = small_pipeline(tmp_path)
    cfg["launcher"] = {"nproc": (torch.cuda.device_count() or cores) + 1}
    with pytest.raises(ConfigError, match=r"\(max_processes\)"):
        load_config(cfg)


def test_the_default_workers_quota_is_the_cores(tmp_path):
    cores = len(os.sched_getaffinity(0))
    cfg = small_pipeline(tmp_path)
    cfg["train_data"]["num_workers"] = max(cores, 2) + 1
    with pytest.raises(ConfigError, match=f"more than the quota of {max(cores, 2)} .max_workers"):
        load_config(cfg)


def test_the_horizon_is_at_most_the_iterations_quota(tmp_path, monkeypatch):
    cfg = small_pipeline(tmp_path)
    cfg["train"] = {"max_iters": 20_000_000}  # the schema allows 1e9; the default quota 1e7
    with pytest.raises(ConfigError, match=r"horizon is 20,000,000 iterations.*max_iterations"):
        load_config(cfg)
    monkeypatch.setenv("BATON_MAX_ITERATIONS", "3")
    cfg["train"] = {"max_epochs": 4}
    with pytest.raises(ConfigError, match=r"horizon is at least 4 iterations.*max_iterations"):
        load_config(cfg)


def test_an_epoch_horizon_is_checked_again_once_the_epoch_length_is_known(tmp_path, monkeypatch):
    monkeypatch.setenv("BATON_MAX_ITERATIONS", "20")
    cfg = load_config(small_pipeline(tmp_path))  # 4 epochs: at least 4 iterations
    with pytest.raises(QuotaError, match=r"train.max_epochs: the run's horizon is 32 iterations"):
        pl.build_pipeline(cfg)
    assert not (tmp_path / "exp").exists()


def test_iteration_checkpoints_are_counted_once_the_epoch_length_is_known(tmp_path, monkeypatch):
    monkeypatch.setenv("BATON_MAX_EXPERIMENT_FILES", "10")
    cfg = small_pipeline(tmp_path)  # 4 epochs of 8 iterations, keep_last: null
    cfg["checkpoint"] = {"keep_last": None, "interval_iters": 2}
    cfg = load_config(cfg)  # at validation: at least the 4 epoch checkpoints
    # 4 at epoch ends, and 12 inside epochs (iterations 2, 4, 6 of each)
    with pytest.raises(
        QuotaError, match=r"checkpoint.keep_last: the checkpoint plan keeps up to 16"
    ):
        pl.build_pipeline(cfg)


def test_a_checkpoint_plan_beyond_the_files_quota_is_refused(tmp_path, monkeypatch):
    cfg = small_pipeline(tmp_path)
    cfg["train"] = {"max_iters": 1_000_000}
    cfg["checkpoint"] = {"keep_last": None, "interval_iters": 1}
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert (
        "the checkpoint plan keeps up to 1,000,000 files, more than the quota of 10,000 "
        "(max_experiment_files)" in _problems(err)["checkpoint.keep_last"]
    )
    cfg["checkpoint"]["keep_last"] = 3
    load_config(cfg)
    monkeypatch.setenv("BATON_MAX_EXPERIMENT_FILES", "3")  # 3 kept + the one being written
    with pytest.raises(ConfigError, match="keeps up to 4 files"):
        load_config(cfg)


def test_a_checkpoint_plan_beyond_the_bytes_quota_is_refused(tmp_path, monkeypatch):
    cfg = small_pipeline(tmp_path)  # keep_last: null, 4 epochs: 4 checkpoints
    monkeypatch.setenv("BATON_MAX_EXPERIMENT_BYTES", "200000")
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert "the checkpoint plan keeps up to 4 files of about" in _problems(err)["checkpoint"]
    assert "BATON_MAX_EXPERIMENT_BYTES" in _problems(err)["checkpoint"]
    cfg["checkpoint"] = {"keep_last": 1}
    load_config(cfg)


def test_quotas_are_not_config_keys(tmp_path):
    cfg = {**small_pipeline(tmp_path), "max_parameters": 10**15}
    with pytest.raises(ConfigError, match="quotas are the operator's decision.*BATON_MAX_PARAM"):
        load_config(cfg)


# --- when a checkpoint is written -----------------------------------------------------


def _snapshot(strategy) -> dict:
    store = strategy.checkpoints
    return {
        "files": sorted(p.name for p in store.checkpoint_dir.iterdir()),
        "manifest": store.manifest_path.read_bytes() if store.manifest_path.exists() else None,
        "journal": store.journal_path.read_bytes() if store.journal_path.exists() else None,
        "listed": store.list(),
    }


def _two_checkpoints(work_dir):
    strategy = make_strategy(work_dir)
    strategy.prepare(mlp(), optim_wrapper={"optimizer": {"type": "SGD", "lr": 0.1}})
    for epoch in (1, 2):
        strategy.save_checkpoint(f"epoch_{epoch:04d}.pth", extra_ckpt={"meta": {"epoch": epoch}})
    return strategy


def _later_strategy(work_dir):
    strategy = make_strategy(work_dir)
    strategy.prepare(mlp(), optim_wrapper={"optimizer": {"type": "SGD", "lr": 0.1}})
    return strategy


def test_a_save_beyond_the_bytes_quota_writes_nothing(work_dir, monkeypatch):
    first = _two_checkpoints(work_dir)
    before = _snapshot(first)
    used = sum(ref.size for ref in before["listed"])
    monkeypatch.setenv("BATON_MAX_EXPERIMENT_BYTES", str(used + 1000))
    later = _later_strategy(work_dir)
    with pytest.raises(QuotaError, match=r"saving epoch_0003.pth \(about [\d,]+ bytes\)") as err:
        later.save_checkpoint("epoch_0003.pth", extra_ckpt={"meta": {"epoch": 3}})
    assert "(max_experiment_bytes)" in str(err.value)
    assert "earlier checkpoints and the manifest are untouched" in str(err.value)
    assert _snapshot(later) == before
    for ref in before["listed"]:
        later.checkpoints.verify(ref)
    with pytest.raises(QuotaError):  # a background save is refused before it starts
        later.save_checkpoint_async("epoch_0003.pth", extra_ckpt={"meta": {"epoch": 3}})
    assert _snapshot(later) == before


def test_a_save_beyond_the_files_quota_writes_nothing(work_dir, monkeypatch):
    first = _two_checkpoints(work_dir)
    before = _snapshot(first)
    monkeypatch.setenv("BATON_MAX_EXPERIMENT_FILES", "2")
    later = _later_strategy(work_dir)
    # writing a committed file again at its position adds no file
    later.save_checkpoint("epoch_0002.pth", extra_ckpt={"meta": {"epoch": 2}})
    with pytest.raises(QuotaError, match=r"3 checkpoint files.*\(max_experiment_files\)"):
        later.save_checkpoint("epoch_0003.pth", extra_ckpt={"meta": {"epoch": 3}})
    assert _snapshot(later)["files"] == before["files"]


def test_a_save_that_would_leave_too_little_free_disk_writes_nothing(work_dir, monkeypatch):
    first = _two_checkpoints(work_dir)
    before = _snapshot(first)
    disk = os.statvfs(work_dir)
    monkeypatch.setenv("BATON_MIN_FREE_BYTES", str(disk.f_bavail * disk.f_frsize + (1 << 30)))
    later = _later_strategy(work_dir)
    with pytest.raises(QuotaError) as err:
        later.save_checkpoint("epoch_0003.pth", extra_ckpt={"meta": {"epoch": 3}})
    assert "bytes free on the filesystem of" in str(err.value)
    assert "less than the floor of" in str(err.value)
    assert "an operator lowers it with BATON_MIN_FREE_BYTES" in str(err.value)
    assert _snapshot(later) == before


def test_a_refused_save_is_permanent():
    assert issubclass(QuotaError, PERMANENT_ERRORS)
    assert issubclass(QuotaError, UntrustedInputError)


# --- where quotas come from -----------------------------------------------------------


@pytest.mark.parametrize("value", ["lots", "0", "-5", "1.5"])
def test_a_bad_quota_in_the_environment_is_an_operator_error(monkeypatch, value):
    monkeypatch.setenv("BATON_MAX_ITERATIONS", value)
    with pytest.raises(UntrustedInputError, match="BATON_MAX_ITERATIONS in the environment must "):
        Quotas.from_environment()


def test_quotas_in_pyproject(tmp_path, monkeypatch):
    monkeypatch.setenv("BATON_PROJECT_DIR", str(tmp_path))
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        "[tool.baton]\nallowed_modules = ['tests']\n"
        "[tool.baton.quotas]\nmax_parameters = 100\nmax_workers = 7\n"
        "[tool.baton.deployments.'train-pipeline/nightly']\nwork_dir = 'nightly'\n"
    )
    quotas = Quotas.from_environment()
    assert (quotas.max_parameters, quotas.max_workers) == (100, 7)
    assert Trust.from_environment().allowed_modules == ("tests",)
    monkeypatch.setenv("BATON_MAX_PARAMETERS", "200")  # the environment wins
    assert Quotas.from_environment().max_parameters == 200
    pyproject.write_text("[tool.baton.quotas]\nmax_paramaters = 100\n")
    with pytest.raises(UntrustedInputError, match=r"unknown key\(s\) \['max_paramaters'\]"):
        Quotas.from_environment()
    pyproject.write_text("[tool.baton.quotas]\nmax_parameters = true\n")
    with pytest.raises(UntrustedInputError, match="max_parameters must be a positive integer"):
        Quotas.from_environment()


def test_a_run_cannot_raise_its_own_quotas():
    """Quotas live in the worker's environment; a run's job variables set none of it (the
    server refuses them: tests/security/test_run_form.py), and the flow refuses a run that
    carries some anyway."""
    env = {"env": {"BATON_MAX_PARAMETERS": "1000000000000"}}
    run = FlowRun(flow_id=uuid4(), job_variables=env)
    with pytest.raises(UntrustedInputError, match=r"this run sets job variables \(env\)"):
        check_this_run(run)
