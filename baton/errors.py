"""Exceptions raised by the engine, one type per kind of failure a user can act on."""


class BatonError(Exception):
    """Base class of every error baton raises on purpose."""


class CheckpointError(BatonError):
    """A checkpoint cannot be used: missing, unreadable, or of the wrong shape."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file or URI does not exist."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (no space, a file size limit, a read-only disk).
    The previous checkpoints and the manifest are untouched."""


class CheckpointCorruptError(CheckpointError):
    """The file exists but is truncated, damaged, or its checksum differs."""


class UnsafeCheckpointError(CheckpointError):
    """Loading the file would need to run code from the pickle; refused by default."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint does not fit the model, optimizer or config it is loaded into."""


class ExperimentLockedError(BatonError):
    """Another process holds the experiment's lock."""


class ConfigError(BatonError):
    """A pipeline config is invalid. ``problems`` lists every problem found."""

    def __init__(self, message: str, problems: list | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


class DataError(BatonError):
    """A dataset cannot be read: an empty or missing folder, an unreadable file, or train
    and validation splits whose classes differ. The message names the file or folder."""
