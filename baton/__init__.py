"""baton: restartable PyTorch training with mmengine's single-device strategy API.

The engine: no Prefect here. ``tasks`` and ``flows`` build on it.
"""

from baton._version import __version__
from baton.checkpoint import (
    CheckpointName,
    CheckpointRef,
    CheckpointStore,
    RetentionPolicy,
    register_scheme,
    trusted_loading,
)
from baton.errors import (
    BatonError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    ConfigError,
    ExperimentLockedError,
    ExperimentMovedError,
    ExperimentNotWritableError,
    ResumeConfigError,
    UnsafeCheckpointError,
)
from baton.optim import AmpOptimWrapper, OptimWrapper
from baton.strategy import SingleDeviceStrategy

__all__ = [
    "AmpOptimWrapper",
    "BatonError",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointName",
    "CheckpointNotFoundError",
    "CheckpointRef",
    "CheckpointStore",
    "CheckpointWriteError",
    "ConfigError",
    "ExperimentLockedError",
    "ExperimentMovedError",
    "ExperimentNotWritableError",
    "OptimWrapper",
    "ResumeConfigError",
    "RetentionPolicy",
    "SingleDeviceStrategy",
    "UnsafeCheckpointError",
    "__version__",
    "register_scheme",
    "trusted_loading",
]
