"""``baton report EXPERIMENT``: the history table, and the summary's curves as a PNG."""

from pathlib import Path

import pytest

from baton.config import validate
from baton.experiment import Experiment
from baton.flows.cli import main
from baton.run import pipeline as pl
from baton.tracking import plot_history

from .conftest import small_config

pytest.importorskip("matplotlib")


def test_report_prints_the_history_and_writes_the_summary_plot(tmp_path, capsys):
    cfg = small_config(tmp_path / "wd", name="reported", **{"train.max_epochs": 3})
    pl.run(validate(cfg))
    folder = tmp_path / "wd" / "reported"
    png = tmp_path / "out" / "curves.png"
    png.parent.mkdir()
    assert main(["report", str(folder), "--output", str(png)]) == 0
    out = capsys.readouterr().out
    header, *rows = out.split("\n\ncurves written")[0].strip().splitlines()
    assert header.split() == [
        "epoch",
        "train/accuracy",
        "train/loss",
        "train/lr",
        "val/accuracy",
        "val/loss",
    ]
    assert [row.split()[0] for row in rows] == ["1", "2", "3"]
    assert str(png) in out
    history = Experiment(tmp_path / "wd", "reported").metrics.epochs()
    assert png.read_bytes() == plot_history(history)  # the run summary's plot
    assert png.read_bytes().startswith(b"\x89PNG")


def test_report_refuses_what_is_not_an_experiment(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "holds no experiment" in capsys.readouterr().err
    assert not list(Path.cwd().glob("empty-curves.png"))
