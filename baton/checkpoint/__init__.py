"""Checkpoint I/O: the file format, atomic verified writes, safe loading, an experiment's store."""

from baton.checkpoint.io import trusted_loading
from baton.checkpoint.loaders import load_uri, register_open_mmlab, register_scheme
from baton.checkpoint.ref import CheckpointName, CheckpointRef
from baton.checkpoint.store import CheckpointStore, RetentionPolicy

__all__ = [
    "CheckpointName",
    "CheckpointRef",
    "CheckpointStore",
    "RetentionPolicy",
    "load_uri",
    "register_open_mmlab",
    "register_scheme",
    "trusted_loading",
]
