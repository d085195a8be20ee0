"""Optimizers as mmengine drives them: the wrappers, and the parameter schedulers.

mmengine's own layout (``mmengine.optim`` holds both). The registry resolves their short
names, so this package sits below it: it imports nothing else of baton; the
registry, the engine and the run import it.

Optimizer wrappers with mmengine's interface: accumulation, clipping, ``update_params``.

``OptimWrapper`` is a drop-in for ``mmengine.optim.OptimWrapper`` and ``AmpOptimWrapper``
for ``mmengine.optim.AmpOptimWrapper``: the same signatures, attributes
(``base_param_settings``, ``message_hub``, ``loss_scaler``, ``_scale_update_param``),
state dict layout, exception types and warnings. Each message starts with mmengine's words
and goes on to say what to do. The deliberate differences (baton's log channel, AMP on the
CPU, no scaler for bfloat16, a caller's ``clip_grad`` left unmodified) are listed in
``docs/mmengine.md``.

The wrapper (accumulation, clipping, mmengine's surface) is in :mod:`baton.optim.wrapper`,
its mixed-precision subclass in :mod:`baton.optim.amp`; both are imported from here.
The parameter schedulers (``StepLR``, ``CosineAnnealingLR``... and their
``*ParamScheduler`` twins) are :mod:`baton.optim.schedulers`.
"""

from baton.optim.amp import AmpOptimWrapper
from baton.optim.wrapper import MessageHub, OptimWrapper

__all__ = ["AmpOptimWrapper", "MessageHub", "OptimWrapper"]
