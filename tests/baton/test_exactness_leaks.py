"""Exactness beyond the weights: running metrics, background writers, horizons, RNGs."""

from baton import pipeline as pl

from .test_pipeline import cfg_for


def test_train_metrics_of_an_epoch_resumed_half_way_cover_the_whole_epoch(tmp_path):
    cfg = cfg_for(tmp_path, "checkpoint.interval_iters=3", "checkpoint.keep_last=null")
    straight = pl.build_pipeline(cfg_for(tmp_path / "straight"))
    pl.train_one_epoch(straight)
    expected = pl.train_one_epoch(straight)

    first = pl.build_pipeline(cfg)
    pl.train_one_epoch(first)
    pl.train_one_epoch(first, stop_at=12)  # iteration checkpoints at 9 and 12, in epoch 2
    latest = first.strategy.checkpoints.latest()
    assert (latest.iter, first.strategy.step_in_epoch) == (12, 4)

    second = pl.build_pipeline(cfg)
    pl.resume(second, latest)
    assert pl.train_one_epoch(second) == expected
