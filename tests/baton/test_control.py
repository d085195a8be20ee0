"""Run control: what follows each epoch is decided once, for the flow and the plain run."""

from dataclasses import dataclass, field

from baton.config import load_config
from baton.run import control

from .test_config import base


def config(**sections):
    data = base()
    data["val_data"] = {"dataset": {"type": "SyntheticClassification"}, "batch_size": 32}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return load_config(data)


def test_plan_follows_the_intervals_and_always_acts_at_the_horizon():
    cfg = config(train={"max_epochs": 5, "val_interval": 2}, checkpoint={"interval": 3})
    plans = {e: control.plan_after_epoch(cfg, e, finished=e == 5) for e in range(1, 6)}
    assert [e for e, p in plans.items() if p.evaluate] == [2, 4, 5]
    assert [e for e, p in plans.items() if p.save] == [3, 5]
    assert not any(p.background for p in plans.values())  # async_save is off


def test_background_saves_only_before_the_horizon():
    cfg = config(checkpoint={"async_save": True})
    assert control.plan_after_epoch(cfg, 1, finished=False).background
    assert not control.plan_after_epoch(cfg, 2, finished=True).background


def test_no_evaluation_without_validation_data():
    data = base()
    cfg = load_config(data)
    assert not control.plan_after_epoch(cfg, 2, finished=True).evaluate


@dataclass
class Recorder:
    """Steps on a plain counter: the state is the number of completed epochs."""

    horizon: int
    calls: list = field(default_factory=list)

    def position(self, state):
        return state, state >= self.horizon

    def train(self, state, epoch):
        self.calls.append(("train", epoch))
        return state + 1

    def evaluate(self, state, epoch):
        self.calls.append(("evaluate", epoch))
        return state

    def save(self, state, epoch, background):
        self.calls.append(("save", epoch, background))
        return state

    def report(self, state):
        self.calls.append(("report", state))


def test_train_to_horizon_runs_the_plan_from_where_the_run_stands():
    cfg = config(train={"max_epochs": 4, "val_interval": 2}, checkpoint={"async_save": True})
    steps = Recorder(horizon=4)
    stops = []
    end = control.train_to_horizon(cfg, 1, steps, before_epoch=lambda s: stops.append(s) or s)
    assert end == 4 and stops == [1, 2, 3]
    assert steps.calls == [
        ("train", 2),
        ("evaluate", 2),
        ("save", 2, True),
        ("report", 2),
        ("train", 3),
        ("save", 3, True),
        ("report", 3),
        ("train", 4),
        ("evaluate", 4),
        ("save", 4, False),
        ("report", 4),
    ]
