"""What travels from a run to its tracker: small frozen values, queued by the sender."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """One value of a metric at a step (``timestamp_ms``: when the run recorded it)."""

    key: str
    value: float
    step: int
    timestamp_ms: int


@dataclass(frozen=True)
class Tag:
    """A tag of the tracker's run (set again: the newest value wins)."""

    key: str
    value: str


@dataclass(frozen=True)
class FileCopy:
    """A file the operator asked to have copied to the tracker (``folder``: where in the
    run's artifacts)."""

    path: str
    folder: str
