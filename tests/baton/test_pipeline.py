"""The configured pipeline: runs, resumes, refuses a different architecture, extends."""

import pytest
import torch

from baton import CheckpointCorruptError, CheckpointMismatchError, ConfigError
from baton.checkpoint import digests
from baton.config import load_config
from baton.run import pipeline as pl

from .helpers import HALVING_PLATEAU
from .test_config import base


def cfg_for(tmp_path, *overrides, **top):
    data = base()
    data["work_dir"] = str(tmp_path / "wd")
    data["val_data"] = {"dataset": {"type": "SyntheticClassification", "seed": 1}, "batch_size": 64}
    data["model"]["dropout"] = 0.2
    data.update(top)
    return load_config(data, list(overrides))


def weights(p):
    return {k: v.clone() for k, v in p.strategy.model.state_dict().items()}


def test_run_trains_saves_and_records_metrics(tmp_path):
    cfg = cfg_for(tmp_path, "train.max_epochs=3")
    p, ref = pl.run(cfg)
    assert p.strategy.epoch == 3 and ref.epoch == 3
    assert {"train/loss", "val/accuracy"} <= set(ref.metrics)
    assert [h["epoch"] for h in p.history] == [1, 2, 3]
    assert [r.epoch for r in p.strategy.checkpoints.list()] == [1, 2, 3]


def test_rerun_of_a_finished_experiment_changes_nothing(tmp_path):
    cfg = cfg_for(tmp_path)
    _, ref = pl.run(cfg)
    p, again = pl.run(cfg)
    assert again == ref and p.strategy.epoch == 2


def test_longer_horizon_continues_and_equals_a_straight_run(tmp_path):
    short = cfg_for(tmp_path, "train.max_epochs=2")
    pl.run(short)
    extended, _ = pl.run(cfg_for(tmp_path, "train.max_epochs=4"))
    straight, _ = pl.run(cfg_for(tmp_path / "b", "train.max_epochs=4"))
    for key, value in weights(straight).items():
        assert torch.equal(weights(extended)[key], value)


def test_resume_with_another_architecture_is_refused(tmp_path):
    pl.run(cfg_for(tmp_path))
    wider = cfg_for(tmp_path, "model.hidden=[32]", "train.max_epochs=3")
    with pytest.raises(CheckpointMismatchError, match="different model"):
        pl.run(wider)


def test_iteration_checkpoints(tmp_path):
    cfg = cfg_for(tmp_path, "checkpoint.interval_iters=3", "checkpoint.keep_last=null")
    p, _ = pl.run(cfg)
    names = sorted(r.uri.rsplit("/", 1)[1] for r in p.strategy.checkpoints.list())
    assert "iter_000003.pth" in names and "epoch_0002.pth" in names


def test_resume_from_a_named_checkpoint(tmp_path):
    p, _ = pl.run(cfg_for(tmp_path, "train.max_epochs=3"))
    first = p.strategy.checkpoints.list()[0]
    assert pl.find_resume_point(cfg_for(tmp_path, resume=first.uri)) == first
    missing = first.uri.replace("epoch_0001", "epoch_0099")
    with pytest.raises(Exception, match="does not exist"):
        pl.find_resume_point(cfg_for(tmp_path, resume=missing))
    with pytest.raises(ConfigError, match="outside the experiment folder"):
        cfg_for(tmp_path, resume=str(tmp_path / "elsewhere.pth"))


def test_resume_never_starts_fresh(tmp_path):
    pl.run(cfg_for(tmp_path))
    assert pl.find_resume_point(cfg_for(tmp_path, resume="never")) is None


def test_load_from_initialises_weights(tmp_path, monkeypatch):
    p, ref = pl.run(cfg_for(tmp_path))
    # Weights from another experiment: the operator allows that experiment's folder.
    monkeypatch.setenv("BATON_CHECKPOINT_ROOTS", str(p.strategy.experiment_dir))
    fresh = cfg_for(
        tmp_path, experiment_name="finetune", load_from={"uri": ref.uri, "strict": True}
    )
    built = pl.build_pipeline(fresh)
    pl.load_weights(built)
    for key, value in weights(p).items():
        assert torch.equal(weights(built)[key], value)


def test_bad_config_writes_nothing(tmp_path):
    data = base()
    data["work_dir"] = str(tmp_path / "wd")
    data["train"]["max_epochs"] = 0
    with pytest.raises(ConfigError):
        load_config(data)
    assert not (tmp_path / "wd").exists()


def test_digits_mlp_reaches_95_percent(tmp_path):
    cfg = load_config("configs/digits_mlp.yaml", {"work_dir": str(tmp_path)})
    _, ref = pl.run(cfg)
    assert ref.metrics["val/accuracy"] >= 0.95


@pytest.mark.slow
def test_digits_cnn_reaches_97_percent(tmp_path):
    cfg = load_config("configs/digits_cnn.yaml", {"work_dir": str(tmp_path)})
    p, _ = pl.run(cfg)
    best = p.strategy.checkpoints.best("val/accuracy")
    assert best.metrics["val/accuracy"] >= 0.97


def test_a_full_disk_stops_the_run_clearly_and_the_next_run_resumes(tmp_path):
    import resource
    import signal

    from baton import CheckpointWriteError

    pl.run(cfg_for(tmp_path, "train.max_epochs=2"))
    longer = cfg_for(tmp_path, "train.max_epochs=4")
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 1024, limits[1]))  # checkpoints no longer fit
    try:
        with pytest.raises(CheckpointWriteError, match="File too large"):
            pl.run(longer)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    store = pl.build_pipeline(longer).strategy.checkpoints
    assert store.latest().epoch == 2
    assert not [p for p in store.checkpoint_dir.iterdir() if p.name.endswith(".tmp")]
    resumed, _ = pl.run(longer)
    straight, _ = pl.run(cfg_for(tmp_path / "b", "train.max_epochs=4"))
    for key, value in weights(straight).items():
        assert torch.equal(weights(resumed)[key], value)


def test_running_metrics_are_the_sample_weighted_means_so_far(tmp_path):
    # SyntheticClassification's 256 samples in batches of 32, then the last, smaller one
    # with a batch size of 48: the means must weight by samples, not by batches.
    p = pl.build_pipeline(cfg_for(tmp_path, "train.max_epochs=1", "train_data.batch_size=48"))
    seen = []
    losses, counts, hits = [], [], []
    model, loss_fn = p.strategy.model, p.loss_fn
    original = loss_fn.forward

    def spy(outputs, targets):
        loss = original(outputs, targets)
        losses.append(float(loss.detach()))
        counts.append(len(targets))
        hits.append(int((outputs.argmax(1) == targets).sum()))
        return loss

    loss_fn.forward = spy
    metrics = pl.train_one_epoch(p, on_iteration=lambda running: seen.append(dict(running)))
    assert model.training and len(seen) == p.epoch_length == 6 and counts[-1] == 16
    for i, running in enumerate(seen):
        n = sum(counts[: i + 1])
        expected = sum(x * c for x, c in zip(losses[: i + 1], counts[: i + 1], strict=True)) / n
        assert running["loss"] == pytest.approx(expected, rel=1e-12)
        assert running["accuracy"] == sum(hits[: i + 1]) / n
    lr = p.strategy.optim_wrapper.optimizer.param_groups[0]["lr"]
    assert metrics == {
        "train/loss": seen[-1]["loss"],
        "train/accuracy": seen[-1]["accuracy"],
        "train/lr": lr,
    }


def _plateau_cfg(tmp_path, *overrides):
    plateau = {**HALVING_PLATEAU, "end": 100}
    # and a step-counting scheduler beside it, for the step-order warnings
    multistep = {"type": "MultiStepLR", "milestones": [3], "gamma": 0.5, "end": 100}
    return cfg_for(
        tmp_path, "checkpoint.keep_last=null", *overrides, param_scheduler=[plateau, multistep]
    )


def _plateau_state(p):
    plateau, _ = p.strategy.param_schedulers
    return plateau.state_dict(), p.strategy.optim_wrapper.get_lr()


def test_reduce_on_plateau_follows_validation_and_resumes_exactly(tmp_path, recwarn):
    straight, _ = pl.run(_plateau_cfg(tmp_path / "a", "train.max_epochs=4"))
    state, lrs = _plateau_state(straight)
    # validated 4 times, reduced after the last 3; MultiStepLR halved it after epoch 3
    assert lrs == {"lr": [0.1 * 0.5**4]}
    assert (state["num_bad_epochs"], state["_global_step"], state["last_step"]) == (0, 4, 3)

    # stopped inside the first epoch, before any scheduler stepped, then resumed
    pl.run(_plateau_cfg(tmp_path / "b", "train.max_epochs=null", "train.max_iters=3"))
    resumed, _ = pl.run(_plateau_cfg(tmp_path / "b", "train.max_epochs=4"))
    assert _plateau_state(resumed) == (state, lrs)
    for key, value in weights(straight).items():
        assert torch.equal(weights(resumed)[key], value)
    assert not [w for w in recwarn if "scheduler.step()" in str(w.message)]


def test_replaying_to_a_validated_epoch_replays_its_plateau_steps(tmp_path):
    cfg = _plateau_cfg(tmp_path, "train.max_epochs=3")
    straight, _ = pl.run(cfg)
    first = straight.strategy.checkpoints.list()[0]
    assert first.epoch == 1
    again = pl.build_pipeline(cfg)
    pl.resume(again, first)
    pl.replay(again, straight.strategy.iter, validated=True)
    assert _plateau_state(again) == _plateau_state(straight)
    assert pl.evaluate(again) and _plateau_state(again) == _plateau_state(straight)  # once


def test_a_checkpoint_saved_without_optimizer_state_resumes_with_a_fresh_optimizer(
    tmp_path, caplog
):
    # checkpoint.save_optimizer: false writes no optimizer state; the resume says so
    no_optimizer = "checkpoint.save_optimizer=false"
    pl.run(cfg_for(tmp_path, "train.max_epochs=1", no_optimizer))
    with caplog.at_level("WARNING", logger="baton"):
        resumed, _ = pl.run(cfg_for(tmp_path, "train.max_epochs=3", no_optimizer))
    assert "holds no optimizer state" in caplog.text and resumed.strategy.epoch == 3
    straight, _ = pl.run(cfg_for(tmp_path / "b", "train.max_epochs=3", no_optimizer))
    # plain SGD keeps no state between steps: with a fresh one the run goes on bitwise
    for key, value in weights(straight).items():
        assert torch.equal(weights(resumed)[key], value)


def test_a_checkpoint_replaced_after_it_was_chosen_is_refused_at_load(tmp_path):
    _, first = pl.run(cfg_for(tmp_path, "train.max_epochs=1"))
    other, _ = pl.run(cfg_for(tmp_path / "b", "train.max_epochs=2"))
    # the file the reference names now holds other bytes (another run's, valid on its own)
    replacement = other.strategy.checkpoints.latest().uri
    with open(replacement, "rb") as src, open(first.uri, "wb") as dst:
        dst.write(src.read())
    fresh = pl.build_pipeline(cfg_for(tmp_path, "train.max_epochs=3"))
    with pytest.raises(CheckpointCorruptError, match="not the checkpoint its reference names"):
        pl.resume(fresh, first)


def test_a_resume_hashes_the_checkpoint_it_chose_once(tmp_path, monkeypatch):
    # the store verifies the file it chooses; the load checks the same bytes without
    # reading them again, unless the file changed since
    cfg = cfg_for(tmp_path, "train.max_epochs=1")
    pl.run(cfg)
    monkeypatch.setattr(digests, "RACY_S", 0.0)  # the checkpoint was written just now
    hashed = []
    original = digests.hash_handle
    monkeypatch.setattr(digests, "hash_handle", lambda h, *a: hashed.append(h) or original(h, *a))
    longer = cfg_for(tmp_path, "train.max_epochs=2")
    ref = pl.find_resume_point(longer)
    pl.resume(pl.build_pipeline(longer), ref)
    assert len(hashed) == 1
    with open(ref.uri, "r+b") as handle:  # rewritten in place, same bytes: checked again
        data = handle.read()
        handle.seek(0)
        handle.write(data)
    pl.resume(pl.build_pipeline(longer), ref)
    assert len(hashed) == 2


def test_a_checkpoint_written_just_now_is_hashed_at_every_check(tmp_path, monkeypatch):
    # with coarse timestamps a second write in the same tick would look unchanged, so a
    # file changed less than RACY_S ago is never taken from the remembered digests
    cfg = cfg_for(tmp_path, "train.max_epochs=1")
    pl.run(cfg)
    hashed = []
    original = digests.hash_handle
    monkeypatch.setattr(digests, "hash_handle", lambda h, *a: hashed.append(h) or original(h, *a))
    longer = cfg_for(tmp_path, "train.max_epochs=2")
    monkeypatch.setattr(digests, "RACY_S", 3600.0)
    pl.resume(pl.build_pipeline(longer), pl.find_resume_point(longer))
    assert len(hashed) == 2


def test_a_replay_writes_no_checkpoint_the_run_it_replays_committed(tmp_path):
    # a rebuilt pipeline trains again up to the run's position: the iteration checkpoints
    # on the way were committed by the run, and are not written (and rotated) again
    cfg = cfg_for(tmp_path, "checkpoint.interval_iters=3", "checkpoint.keep_last=null")
    p = pl.build_pipeline(cfg)
    pl.replay(p, 2 * p.epoch_length)
    assert p.strategy.iter == 2 * p.epoch_length
    assert p.strategy.checkpoints.list() == []
