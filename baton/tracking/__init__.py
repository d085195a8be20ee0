"""Tracking: a run's metrics and checkpoints mirrored to an external tracker (MLflow).

Owns the operator's tracking settings (``settings.py``: the tracking URI is an operator
setting, never a run parameter), the bounded background sender that keeps training from
ever waiting for a tracker (``sender.py``), the MLflow sink (``mlflow_sink.py``, the one
module that imports ``mlflow``, and only when a tracking URI is set), the run's tracker
that mirrors ``metrics.jsonl`` and the lineage's committed checkpoints (``tracker.py``),
and the curves of an experiment's history (``curves.py``, matplotlib when installed).
Built on ``experiment``, ``checkpoint`` and ``trust``; it must not import the packages
above it (data, build, engine, config, run).
"""

from baton.tracking.curves import CURVES, plot_history
from baton.tracking.sender import Sender, SendReport
from baton.tracking.settings import TrackingSettings
from baton.tracking.tracker import RunIdentity, RunTracker

__all__ = [
    "CURVES",
    "RunIdentity",
    "RunTracker",
    "SendReport",
    "Sender",
    "TrackingSettings",
    "plot_history",
]
