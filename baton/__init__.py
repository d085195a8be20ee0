"""baton: restartable PyTorch training with mmengine's single-device and DDP strategy APIs.

The engine: no Prefect here. ``tasks`` and ``flows`` build on it. Its packages, each
importing only those before it (``tests/test_layering.py``, ``docs/architecture.md``):
``trust``, ``checkpoint``, ``experiment``, ``data``, ``optim``, ``build``, ``engine``,
``config``, ``run``; beside them the small modules every package may use: ``errors``,
``lifetime``, ``randomness``, ``kinds``, ``models``, ``markdown``.
"""

from baton import _moved
from baton._version import __version__
from baton.checkpoint import (
    CheckpointName,
    CheckpointRef,
    CheckpointStore,
    RetentionPolicy,
    register_scheme,
    trusted_loading,
)
from baton.engine.ddp import DDPStrategy
from baton.engine.strategy import SingleDeviceStrategy
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
    RankFailedError,
    ResumeConfigError,
    UnsafeCheckpointError,
)
from baton.optim import AmpOptimWrapper, OptimWrapper

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
    "DDPStrategy",
    "ExperimentLockedError",
    "ExperimentMovedError",
    "ExperimentNotWritableError",
    "OptimWrapper",
    "RankFailedError",
    "ResumeConfigError",
    "RetentionPolicy",
    "SingleDeviceStrategy",
    "UnsafeCheckpointError",
    "__version__",
    "register_scheme",
    "trusted_loading",
]

_moved.install()


def __getattr__(name: str):
    # ``baton.strategy`` and the other old top-level modules, for one release (_moved.py)
    return _moved.moved_attribute(name)
