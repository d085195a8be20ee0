"""The engine: mmengine's strategy API on one device, and what it delegates to.

Owns :class:`SingleDeviceStrategy` (``strategy.py``: mmengine's signatures and semantics,
what goes into a checkpoint and how a loaded one is put back), the assembly of its model,
optimizer wrapper and schedulers from objects or config dicts (``assemble.py``), the
process settings its ``env_kwargs`` make (``environment.py``) and SyncBN conversion
(``convert.py``). A distributed strategy joins here, beside the single-device one. It
builds through ``build``, keeps its experiment's folder through ``experiment`` and writes
through ``checkpoint``; it must not import the config or the run packages (the strategy
knows no pipeline config) nor Prefect.
"""

from baton.engine.strategy import SingleDeviceStrategy

__all__ = ["SingleDeviceStrategy"]
