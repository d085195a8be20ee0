"""A resume continues the run its checkpoint says, or is refused; a fork changes it on purpose.

One test per row of what used to go wrong: each change is refused with its old and new
value, and a fork applies it in full and records it.
"""

from pathlib import Path

import pytest
import torch

from baton import ResumeConfigError
from baton.run import pipeline as pl
from baton.run.resume_policy import (
    FREE,
    KEY_CLASSES,
    RUN,
    START,
    VALIDATION_KEYS,
    classify,
    compare,
    reads_validation,
    schema_keys,
    steering_keys,
)

from .helpers import HALVING_PLATEAU
from .test_pipeline import cfg_for

MULTISTEP = [{"type": "MultiStepLR", "milestones": [3], "gamma": 0.5}]


def first_two_epochs(tmp_path, *overrides, **top):
    """Train two epochs (8 iterations each) and return the newest checkpoint."""
    p, _ = pl.run(cfg_for(tmp_path, "train.max_epochs=2", *overrides, **top))
    return p.strategy.checkpoints.latest()


def later(tmp_path, *overrides, **top):
    """The config of a run to epoch 4, with changes."""
    return cfg_for(tmp_path, "train.max_epochs=4", *overrides, **top)


def forked(cfg, ref):
    """A pipeline of ``cfg`` resumed (forked) from ``ref``, before any further training."""
    p = pl.build_pipeline(cfg)
    pl.resume(p, ref)
    return p


def straight_to_epoch_2(tmp_path, cfg):
    """A fresh pipeline of ``cfg`` trained to the end of epoch 2 (the fork's reference)."""
    p = pl.build_pipeline(cfg.model_copy(update={"work_dir": str(tmp_path / "straight")}))
    pl.train_one_epoch(p)
    pl.train_one_epoch(p)
    return p


def refusal(cfg) -> str:
    with pytest.raises(ResumeConfigError) as caught:
        pl.run(cfg)
    message = str(caught.value)
    assert "\n" not in message and "fork" in message
    return message


def meta_of(ref) -> dict:
    return torch.load(ref.uri, weights_only=True)["meta"]


def test_every_key_of_the_schema_has_exactly_one_class():
    assert set(schema_keys()) == set(KEY_CLASSES)
    assert classify("optim_wrapper.optimizer.lr") is RUN
    assert classify("param_scheduler.0.milestones") is RUN
    assert classify("model.hidden") is START
    assert classify("val_data") is FREE and classify("load_from") is START
    assert classify("a_key_nobody_classified") is RUN


def test_free_keys_change_without_a_fork_and_the_checkpoint_records_them(tmp_path):
    first_two_epochs(tmp_path)
    free = later(
        tmp_path,
        "train.val_interval=2",
        "train.log_interval=7",
        "checkpoint.interval_iters=5",
        "val_data.batch_size=16",
    )  # retention is free for the resume policy, but fixed by the experiment (test_ownership)
    p, ref = pl.run(free)
    assert p.strategy.epoch == 4
    assert meta_of(ref)["config"] == free.model_dump(mode="json")
    assert "forks" not in meta_of(ref)


def test_batch_size(tmp_path, monkeypatch):
    source = first_two_epochs(tmp_path)
    # The fork into another experiment reads the source's checkpoint: the operator allows it.
    monkeypatch.setenv("BATON_CHECKPOINT_ROOTS", str(Path(source.uri).parent))
    wider = ("train_data.batch_size=64",)
    assert "train_data.batch_size: 32 -> 64" in refusal(later(tmp_path, *wider))
    # In place, the fork writes a lineage of its own: the line it continues keeps its files
    # (its 4-iteration epochs would otherwise order its checkpoints before epoch 2).
    in_place, _ = pl.run(later(tmp_path, *wider, fork=True))
    first, *_, newest = in_place.strategy.checkpoints.lineages()
    assert newest.reason == "fork" and newest.parent.sha256 == source.sha256
    assert [r.epoch for r in first.checkpoints] == [1, 2]
    assert [r.epoch for r in newest.checkpoints] == [3, 4]

    fork = later(tmp_path, *wider, fork=True, experiment_name="wider", resume=source.uri)
    p, ref = pl.run(fork)
    assert (p.strategy.epoch, p.strategy.iter, p.epoch_length) == (4, 16, 4)  # epochs 3, 4 whole
    meta = meta_of(ref)
    assert meta["config"]["train_data"]["batch_size"] == 64
    assert [h["epoch"] for h in meta["history"]] == [1, 2, 3, 4]
    [record] = meta["forks"]
    assert record["from"] == "epoch_0002.pth" and (record["epoch"], record["iter"]) == (2, 16)
    assert record["sha256"] == source.sha256
    assert record["changes"] == [
        {"key": "train_data.batch_size", "old": 32, "new": 64, "class": "RUN"}
    ]
    again, _ = pl.run(fork.model_copy(update={"fork": False, "resume": "auto"}))
    assert again.strategy.iter == 16


def test_learning_rate_weight_decay_milestones_and_gamma(tmp_path):
    momentum = "optim_wrapper.optimizer.momentum=0.9"
    source = first_two_epochs(tmp_path, momentum, param_scheduler=MULTISTEP)
    changes = (
        momentum,
        "optim_wrapper.optimizer.lr=0.05",
        "optim_wrapper.optimizer.weight_decay=0.001",
    )
    schedule = [{"type": "MultiStepLR", "milestones": [2], "gamma": 0.1}]
    message = refusal(later(tmp_path, *changes, param_scheduler=schedule))
    for shown in (
        "optim_wrapper.optimizer.lr: 0.1 -> 0.05",
        "optim_wrapper.optimizer.weight_decay: (unset) -> 0.001",
        "param_scheduler.0.milestones: [3] -> [2]",
        "param_scheduler.0.gamma: 0.5 -> 0.1",
    ):
        assert shown in message

    fork = later(tmp_path, *changes, param_scheduler=schedule, fork=True)
    p = forked(fork, source)
    expected = straight_to_epoch_2(tmp_path, fork)
    groups, reference = p.strategy.optim_wrapper.param_groups, expected.strategy.optim_wrapper
    assert p.strategy.optim_wrapper.get_lr() == reference.get_lr() == {"lr": [pytest.approx(0.005)]}
    assert groups[0]["weight_decay"] == 0.001
    saved = torch.load(source.uri, weights_only=True)["optimizer"]["state"]
    state = p.strategy.optim_wrapper.optimizer.state_dict()["state"]
    assert torch.equal(state[0]["momentum_buffer"], saved[0]["momentum_buffer"])  # carried
    _, ref = pl.run(fork)
    meta = meta_of(ref)
    assert meta["config"]["optim_wrapper"]["optimizer"]["lr"] == 0.05
    assert {c["key"] for c in meta["forks"][0]["changes"]} == {
        "optim_wrapper.optimizer.lr",
        "optim_wrapper.optimizer.weight_decay",
        "param_scheduler.0.milestones",
        "param_scheduler.0.gamma",
    }


def test_clip_grad_shuffle_and_scheduler_type(tmp_path):
    source = first_two_epochs(tmp_path, param_scheduler=MULTISTEP)
    changes = ("optim_wrapper.clip_grad={max_norm: 0.5}", "train_data.shuffle=false")
    cosine = [{"type": "CosineAnnealingLR", "T_max": 4, "eta_min": 0.001}]
    message = refusal(later(tmp_path, *changes, param_scheduler=cosine))
    assert "optim_wrapper.clip_grad: None -> {" in message and "'max_norm': 0.5" in message
    assert "train_data.shuffle: True -> False" in message
    assert "param_scheduler.0: {'type': 'MultiStepLR'" in message and "CosineAnnealingLR" in message

    fork = later(tmp_path, *changes, param_scheduler=cosine, fork=True)
    p = forked(fork, source)
    assert p.strategy.optim_wrapper.clip_grad_kwargs == {
        "max_norm": 0.5,
        "norm_type": 2.0,
        "error_if_nonfinite": False,
    }
    assert p.train_loader.shuffle is False
    assert [type(s).__name__ for s in p.strategy.param_schedulers] == ["CosineAnnealingLR"]
    reference = straight_to_epoch_2(tmp_path, fork).strategy
    assert p.strategy.optim_wrapper.get_lr() == reference.optim_wrapper.get_lr()
    assert p.strategy.param_schedulers[0].state_dict() == reference.param_schedulers[0].state_dict()


def test_sgd_to_adam(tmp_path):
    source = first_two_epochs(tmp_path)
    adam = ("optim_wrapper.optimizer={type: Adam, lr: 0.001}",)
    message = refusal(later(tmp_path, *adam))
    assert "optim_wrapper.optimizer: {'type': 'SGD', 'lr': 0.1} -> {'type': 'Adam'" in message

    p = forked(later(tmp_path, *adam, fork=True), source)
    assert type(p.strategy.optim_wrapper.optimizer).__name__ == "Adam"
    assert not p.strategy.optim_wrapper.optimizer.state  # SGD's momentum does not fit Adam
    _, ref = pl.run(later(tmp_path, *adam, fork=True))
    checkpoint = torch.load(ref.uri, weights_only=True)
    assert checkpoint["meta"]["forks"][0]["optimizer_state"] == "fresh"
    assert "exp_avg" in checkpoint["optimizer"]["state"][0]


def test_seed_and_accumulative_counts(tmp_path, caplog):
    source = first_two_epochs(tmp_path)
    changes = ("randomness.seed=5", "optim_wrapper.accumulative_counts=2")
    message = refusal(later(tmp_path, *changes))
    assert "randomness.seed: 0 -> 5" in message
    assert "optim_wrapper.accumulative_counts: 1 -> 2" in message
    assert "accumulation window" not in caplog.text  # no misleading warning any more

    p = forked(later(tmp_path, *changes, fork=True), source)
    assert p.strategy.seed == p.train_loader.seed == 5
    assert p.strategy.optim_wrapper._accumulative_counts == 2
    assert p.strategy.optim_wrapper.inner_count == p.strategy.iter == 16


def test_no_configured_seed_continues_with_the_drawn_one(tmp_path):
    first_two_epochs(tmp_path, "randomness.seed=null")
    p, _ = pl.run(later(tmp_path, "randomness.seed=null"))
    assert p.strategy.epoch == 4


def test_data_changes_fork_only_at_the_end_of_an_epoch(tmp_path):
    cfg = cfg_for(tmp_path, "checkpoint.interval_iters=3", "train.max_epochs=2")
    p = pl.build_pipeline(cfg)
    pl.train_one_epoch(p)
    pl.train_one_epoch(p, stop_at=12)
    inside = p.strategy.checkpoints.latest()
    assert inside.iter == 12
    with pytest.raises(ResumeConfigError, match="inside epoch 2.*end of an epoch"):
        pl.run(cfg_for(tmp_path, "train_data.shuffle=false", fork=True, resume=inside.uri))


def test_another_model_is_refused_even_for_a_fork(tmp_path):
    first_two_epochs(tmp_path)
    for fork in (False, True):
        with pytest.raises(ResumeConfigError, match=r"different model.*model.dropout: 0.2 -> 0.3"):
            pl.run(later(tmp_path, "model.dropout=0.3", fork=fork))


def test_raising_the_horizon_with_accumulation_is_exact_or_refused(tmp_path, caplog):
    def iters(n):
        return (
            "train.max_epochs=null",
            f"train.max_iters={n}",
            "optim_wrapper.accumulative_counts=3",
        )

    # 9 is a multiple of 3: every window so far was whole, so 9 -> 18 continues exactly.
    pl.run(cfg_for(tmp_path / "exact", *iters(9)))
    extended, _ = pl.run(cfg_for(tmp_path / "exact", *iters(18)))
    straight, _ = pl.run(cfg_for(tmp_path / "straight", *iters(18)))
    for key, value in straight.strategy.model.state_dict().items():
        assert torch.equal(extended.strategy.model.state_dict()[key], value)

    # 10 cut the window 9..11 short and stepped at 10: 10 -> 20 cannot be exact.
    pl.run(cfg_for(tmp_path, *iters(10)))
    with pytest.raises(ResumeConfigError, match="from 10 to 20 iterations cannot continue exactly"):
        pl.run(cfg_for(tmp_path, *iters(20)))
    p, ref = pl.run(cfg_for(tmp_path, *iters(20), fork=True))
    assert p.strategy.iter == 20
    assert "were not saved" not in caplog.text  # that window was stepped, not lost
    assert [c["key"] for c in meta_of(ref)["forks"][0]["changes"]] == ["train.max_iters"]


def test_compare_reads_a_checkpoint_config_of_an_older_schema(tmp_path):
    current = cfg_for(tmp_path).model_dump(mode="json")
    older = {k: v for k, v in current.items() if k != "fork"}  # a key added since
    older["a_key_removed_since"] = True
    assert compare(older, current) == []


def test_a_fork_from_a_checkpoint_without_optimizer_state_records_a_fresh_optimizer(tmp_path):
    no_optimizer = "checkpoint.save_optimizer=false"
    source = first_two_epochs(tmp_path, no_optimizer)
    fork = later(tmp_path, no_optimizer, "optim_wrapper.optimizer.lr=0.05", fork=True)
    p = forked(fork, source)
    assert p.forks[-1]["optimizer_state"] == "fresh"


# --- keys that steer training: the table is checked against what training reads ----------

PLATEAU = [{**HALVING_PLATEAU, "end": 100}]
SCHEDULER_KINDS = {"steps": MULTISTEP, "plateau": PLATEAU}

# A changed value for every key the table calls free, applied on resume: each must leave
# training bitwise equal under every scheduler kind where it stays free. A free key added
# to the schema without a value here fails test_every_free_key_has_a_value_to_try.
FREE_CHANGES = {
    "train.val_interval": "2",
    "train.log_interval": "3",
    "val_data.dataset": "{type: SyntheticClassification, seed: 2}",
    "val_data.batch_size": "16",
    "val_data.shuffle": "true",
    "val_data.drop_last": "true",
    "val_data.num_workers": "1",
    "val_data.pin_memory": "true",
    "val_data.persistent_workers": "true",
    "val_data.prefetch_factor": "3",
    "train_data.num_workers": "1",
    "launcher.backend": "gloo",
    "train_data.pin_memory": "true",
    "train_data.persistent_workers": "true",
    "train_data.prefetch_factor": "3",
    "checkpoint.interval": "2",
    "checkpoint.interval_iters": "5",
    "checkpoint.save_optimizer": "false",
    "checkpoint.async_save": "true",
}
# Free keys tried elsewhere: where the experiment lives and which checkpoint starts the run
# (test_store_integrity, test_moved_experiment, test_store_lineage), the horizon (the
# horizon's own tests), retention (fixed by the experiment: test_ownership).
FREE_ELSEWHERE = {
    "experiment_name",
    "work_dir",
    "resume",
    "fork",
    "train.max_epochs",
    "train.max_iters",
    "checkpoint.keep_last",
    "checkpoint.keep_best",
    "checkpoint.best_metric",
    "checkpoint.best_mode",
    "launcher.nproc",  # tests/distributed: a resume on another number of processes
}
# Keys that go with another one (a loader's worker options need workers).
COMPANIONS = {
    "val_data.persistent_workers": ("val_data.num_workers=1",),
    "val_data.prefetch_factor": ("val_data.num_workers=1",),
    "train_data.persistent_workers": ("train_data.num_workers=1",),
    "train_data.prefetch_factor": ("train_data.num_workers=1",),
}


def test_every_free_key_has_a_value_to_try():
    free = {k for k in KEY_CLASSES if classify(k) is FREE}
    assert free == set(FREE_CHANGES) | FREE_ELSEWHERE


def test_a_scheduler_that_reads_validation_makes_validation_change_the_run():
    assert steering_keys(later(Path("/tmp"), param_scheduler=MULTISTEP).model_dump()) == set()
    plateau = later(Path("/tmp"), param_scheduler=PLATEAU).model_dump(mode="json")
    assert steering_keys(plateau) == set(VALIDATION_KEYS)
    for key in VALIDATION_KEYS:
        assert classify(key) is FREE and classify(key, steering=steering_keys(plateau)) is RUN
    assert classify("val_data", steering=steering_keys(plateau)) is RUN
    assert classify("val_data.num_workers", steering=steering_keys(plateau)) is FREE
    # a scheduler type that cannot be resolved is taken to read validation: the safe answer
    assert reads_validation({"param_scheduler": [{"type": "nowhere.Scheduler"}]})


def _free_cases():
    for kind, schedule in SCHEDULER_KINDS.items():
        steering = steering_keys({"param_scheduler": schedule})
        for key, value in FREE_CHANGES.items():
            if classify(key, steering=steering) is FREE:
                yield pytest.param(kind, key, value, id=f"{kind}-{key}")


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "key", "value"), list(_free_cases()))
def test_a_free_key_changed_on_resume_trains_bitwise_equal(tmp_path, kind, key, value):
    # The horizon stays at 4 epochs: the run resumed at epoch 2 differs from the straight
    # one only by the free key.
    schedule = SCHEDULER_KINDS[kind]
    straight, _ = pl.run(later(tmp_path, param_scheduler=schedule))
    [epoch_2] = [r for r in straight.strategy.checkpoints.list() if r.epoch == 2]
    extra = (*COMPANIONS.get(key, ()), f"{key}={value}")
    changed = later(tmp_path, *extra, param_scheduler=schedule, resume=epoch_2.uri)
    resumed, _ = pl.run(changed)
    assert resumed.strategy.epoch == 4
    assert resumed.strategy.optim_wrapper.get_lr() == straight.strategy.optim_wrapper.get_lr()
    for name, tensor in straight.strategy.model.state_dict().items():
        assert torch.equal(resumed.strategy.model.state_dict()[name], tensor), name


@pytest.mark.parametrize(
    "change", ["val_data.dataset.seed=2", "val_data.batch_size=16", "train.val_interval=2"]
)
def test_with_a_plateau_scheduler_validation_changes_are_refused_or_forked(tmp_path, change):
    source = first_two_epochs(tmp_path, param_scheduler=PLATEAU)
    key, new = change.split("=")
    message = refusal(later(tmp_path, change, param_scheduler=PLATEAU))
    assert f"{key}: " in message and f"-> {new}" in message
    p, ref = pl.run(later(tmp_path, change, param_scheduler=PLATEAU, fork=True))
    assert p.strategy.epoch == 4
    [record] = meta_of(ref)["forks"]
    assert record["sha256"] == source.sha256
    assert [c["key"] for c in record["changes"]] == [key]
    assert p.strategy.checkpoints.head().reason == "fork"
    # the same change under a schedule that reads no validation is free, as before
    steps = tmp_path / "steps"
    first_two_epochs(steps, param_scheduler=MULTISTEP)
    q, ref = pl.run(later(steps, change, param_scheduler=MULTISTEP))
    assert q.strategy.epoch == 4 and "forks" not in meta_of(ref)
