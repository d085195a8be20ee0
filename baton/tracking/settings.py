"""The operator's tracking settings: where a run's metrics go (MLflow) and how hard the
run tries to send them.

Like every trust setting they come only from the operator (contract 10): the worker's
environment (``BATON_MLFLOW_TRACKING_URI``, ``BATON_MLFLOW_EXPERIMENT``,
``BATON_TRACKING_QUEUE_SIZE``, ``BATON_TRACKING_CLOSE_TIMEOUT_S``,
``BATON_TRACKING_RETRY_S``, ``BATON_TRACKING_POLL_S``, ``BATON_MLFLOW_COPY_CHECKPOINTS``), which wins, or the
``[tool.baton.tracking]`` table of the project's pyproject.toml (the same names in lower
case, without ``BATON_``). A run's config, overrides and parameters cannot name a tracker:
a hostile run form could otherwise send the run's config and metrics anywhere.

Without a tracking URI nothing is tracked and ``mlflow`` is never imported.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from baton.errors import UntrustedInputError
from baton.trust.allowances import OperatorSettings, Trust

# --- the defaults, all in one place ---------------------------------------------------

# The MLflow experiment a run is filed under (one per baton project, by default).
DEFAULT_MLFLOW_EXPERIMENT = "baton"
# Values waiting to be sent; more than this while the tracker is down are dropped (and
# counted, and reported): about 80 bytes each, so the default bound is ~8 MB.
DEFAULT_QUEUE_SIZE = 100_000
# How long the end of a run waits for the tracker to take what is waiting.
DEFAULT_CLOSE_TIMEOUT_S = 30.0
# How long the sender waits before it tries again after a failed send.
DEFAULT_RETRY_S = 5.0
# How often the sender reads what the metrics log gained (a value reaches the tracker
# about this long after the run recorded it).
DEFAULT_POLL_S = 1.0

# setting -> (environment variable, type)
_SETTINGS: dict[str, tuple[str, type]] = {
    "mlflow_tracking_uri": ("BATON_MLFLOW_TRACKING_URI", str),
    "mlflow_experiment": ("BATON_MLFLOW_EXPERIMENT", str),
    "queue_size": ("BATON_TRACKING_QUEUE_SIZE", int),
    "close_timeout_s": ("BATON_TRACKING_CLOSE_TIMEOUT_S", float),
    "retry_s": ("BATON_TRACKING_RETRY_S", float),
    "poll_s": ("BATON_TRACKING_POLL_S", float),
    "mlflow_copy_checkpoints": ("BATON_MLFLOW_COPY_CHECKPOINTS", bool),
}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class TrackingSettings:
    """Where a run's metrics go and how the sender behaves (see the module docstring).

    Attributes:
        mlflow_tracking_uri: The MLflow tracking server (``http://host:5000``) or store;
            ``None``: no tracking.
        mlflow_experiment: The MLflow experiment runs are filed under.
        queue_size: Values waiting to be sent at most; more are dropped and reported.
        close_timeout_s: How long the end of a run waits for the tracker.
        retry_s: How long the sender waits after a failed send.
        poll_s: How often the sender reads what the metrics log gained.
        mlflow_copy_checkpoints: Upload each committed checkpoint file as an MLflow
            artifact too (by default only a reference: path, sha256, epoch, iteration).
    """

    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = DEFAULT_MLFLOW_EXPERIMENT
    queue_size: int = DEFAULT_QUEUE_SIZE
    close_timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S
    retry_s: float = DEFAULT_RETRY_S
    poll_s: float = DEFAULT_POLL_S
    mlflow_copy_checkpoints: bool = False

    @property
    def enabled(self) -> bool:
        """Whether a tracker is configured."""
        return bool(self.mlflow_tracking_uri)

    @classmethod
    def of(cls, settings: OperatorSettings) -> "TrackingSettings":
        """The tracking settings of one reading of the operator's settings.

        Raises:
            UntrustedInputError: An unknown key in ``[tool.baton.tracking]``, or a value
                of the wrong type or out of range.
        """
        table = settings.subtable("tracking")
        where = f"[tool.baton.tracking] in {settings.project / 'pyproject.toml'}"
        unknown = sorted(set(table) - set(_SETTINGS))
        if unknown:
            raise UntrustedInputError(
                f"{where} has unknown key(s) {unknown}; known: {', '.join(_SETTINGS)}"
            )
        values: dict[str, Any] = {}
        for name, (variable, kind) in _SETTINGS.items():
            if variable in settings.environ:
                values[name] = _parse(settings.environ[variable], kind, variable)
            elif name in table:
                values[name] = _check_type(table[name], kind, f"{where}: {name}")
        made = cls(**values)
        made._check()
        return made

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> "TrackingSettings":
        """The settings in effect for this process (the run's held reading inside a run)."""
        trust = Trust.from_environment(environ)
        if trust.settings is None:
            return cls()
        return cls.of(trust.settings)

    def _check(self) -> None:
        if self.queue_size < 1:
            raise UntrustedInputError(
                f"tracking queue_size {self.queue_size} must be at least 1; set "
                "BATON_TRACKING_QUEUE_SIZE or queue_size under [tool.baton.tracking]"
            )
        for name in ("close_timeout_s", "retry_s", "poll_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise UntrustedInputError(
                    f"tracking {name} {value} must be a finite number of seconds >= 0; set "
                    f"{_SETTINGS[name][0]} or {name} under [tool.baton.tracking]"
                )
        if self.mlflow_tracking_uri is not None and not self.mlflow_tracking_uri.strip():
            object.__setattr__(self, "mlflow_tracking_uri", None)


def _parse(text: str, kind: type, variable: str) -> Any:
    """An environment variable's value as ``kind``."""
    if kind is bool:
        if text.strip().lower() in _TRUE + _FALSE:
            return text.strip().lower() in _TRUE
        raise UntrustedInputError(f"{variable}={text!r} is not a yes/no value; use 1 or 0")
    try:
        return kind(text)
    except ValueError as err:
        raise UntrustedInputError(
            f"{variable}={text!r} is not a {kind.__name__}; set a {kind.__name__} value"
        ) from err


def _check_type(value: Any, kind: type, where: str) -> Any:
    """A pyproject value, checked to be of ``kind`` (an int is a float)."""
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise UntrustedInputError(f"{where} must be a {kind.__name__}, not {value!r}")
    return value
