"""Checkpoint I/O: the file format, atomic verified writes, safe loading, an experiment's store.

Owns how a checkpoint is written and read (``format.py``, ``atomic.py``, ``background.py``,
``safe_load.py``, all through ``io.py``; URI schemes in ``loaders.py``), what goes into one
and how a loaded one is put back (``content.py``), committing it (``writer.py``), and the
committed checkpoints of one experiment (``store.py``: manifest, lineages, retention,
integrity, lock in the modules beside it); a sharded format joins here. It asks ``trust``
for the quotas a write must respect; it must not import the experiment folder, the engine,
the config or the run packages, which all write and read through it.
"""

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
