"""Exceptions raised by the engine, one type per kind of failure a user can act on, and
how a message quotes the bad value it names (:func:`short_repr`)."""

from typing import Any


def short_repr(value: Any) -> str:
    """``repr(value)`` cut to 60 characters, to quote a bad value in a message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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


class ExperimentMovedError(BatonError):
    """The experiment folder a run holds was moved or deleted while the run trained: the
    run stops before its next write, so that nothing is written at the old path (no
    second half of the experiment there). The message says where the folder is now, when
    it can tell, and how to resume it there."""


class ExperimentNotWritableError(BatonError):
    """The experiment folder cannot be written (a read-only folder or disk, no permission):
    a run cannot take its lock, so it starts nothing. Not a fault of the moment: retrying
    fails the same way until the folder is made writable."""


class ConfigError(BatonError, ValueError):
    """A pipeline config is invalid. ``problems`` lists every problem found."""

    def __init__(self, message: str, problems: list | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


class UntrustedInputError(ConfigError):
    """A run's input asks for something the operator did not allow: a module, a URI
    scheme, a path outside the experiment and the operator's roots, a device file."""


class QuotaError(UntrustedInputError):
    """A run asks for more than an operator's quota allows: parameters, iterations, loader
    workers, an experiment's checkpoint files or bytes, or the free disk a save must leave.
    Refused before the work (at validation, when the pipeline is built, or before a
    checkpoint is written), naming the quota and where an operator changes it."""


class MissingInputError(UntrustedInputError):
    """A path a run's input names is where it may be, but nothing is there (yet)."""


class CheckpointOutsideError(CheckpointError):
    """A path the store was asked to read, verify, commit or delete is not a regular file
    directly inside the experiment's ``checkpoints/`` folder (an absolute or ``..`` path,
    a symbolic link, a device). The store reports it and never follows it."""


class ManifestVersionError(CheckpointError):
    """The manifest was written by a newer baton; it is left untouched."""


class ManifestReadError(CheckpointError):
    """The manifest could not be read just now (an I/O error, a permission, no memory):
    a fault of the moment, not damage, so it is left untouched and never rebuilt from the
    checkpoint files; a retry reads it again."""


class TrainingDivergedError(BatonError):
    """Training produced a non-finite metric (NaN or infinity); nothing was committed from
    the diverged state, and the checkpoints committed before it are intact."""


class RestartRefusedError(BatonError):
    """An automatic restart was refused: the restart bound is spent, or `restart_of` does
    not name a crashed flow run."""


class ResumeConfigError(ConfigError, CheckpointMismatchError):
    """A resume would change keys that change the run (see ``baton.run.resume_policy``);
    the message lists them and names the explicit fork."""


class VerificationRefusedError(ConfigError):
    """Two checkpoints cannot be verified against each other: not of one lineage, in the
    wrong order, not committed, or trained in an environment that breaks bitwise
    equality with this one. The message says which, and what to verify instead."""


class NotReproducedError(BatonError):
    """A checkpoint trained again from an earlier one of its lineage is not bitwise equal
    to it (``baton verify``); the message names the first entries that differ."""


class RetentionConflictError(ConfigError):
    """A run asks for another retention than the one its experiment was created with. A
    run cannot change what an experiment keeps; an operator can (``baton ckpt retention``)."""


class DataError(BatonError):
    """A dataset cannot be read: an empty or missing folder, an unreadable file, or train
    and validation splits whose classes differ. The message names the file or folder."""


class RankFailedError(BatonError):
    """A training process of a run on several processes died (or never started); the
    others were stopped. A retry starts them again from the newest committed checkpoint."""
