"""An experiment's home: the folder ``work_dir/<experiment_name>`` and what lives in it.

Owns the folder's layout and its one owner, :class:`Experiment` (``folder.py``: the
checkpoint store with the experiment's retention, ``experiment.json``, the lock, run
logs), the metrics log (``metrics.py``: ``metrics.jsonl`` and its table) and the restart
log with its bound (``restarts.py``: ``runs/restarts.json``). Built on ``checkpoint`` and
``trust``; it must not import the engine, the config or the run packages above it: they
all reach the folder through it (a config is read through :class:`ExperimentSettings`).
"""

from baton.experiment.folder import (
    Experiment,
    ExperimentSettings,
    KeepsCheckpoints,
    check_experiment_name,
    retention_flags,
)
from baton.experiment.metrics import MetricsLog, history_table
from baton.experiment.restarts import RestartBound, RestartLog

__all__ = [
    "Experiment",
    "ExperimentSettings",
    "KeepsCheckpoints",
    "MetricsLog",
    "RestartBound",
    "RestartLog",
    "check_experiment_name",
    "history_table",
    "retention_flags",
]
