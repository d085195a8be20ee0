"""A training run: a pipeline built from a config and driven to its horizon.

Owns the live pipeline and its build (``live.py``), the steps on it (``steps.py``: resume,
train an epoch, evaluate, save, replay), the training loop (``loop.py``), run control
(``control.py``: what follows an epoch, the loop to the horizon, where a run continues
from), the resume policy (``resume_policy/``: which config keys may change on resume,
forks), SIGTERM deferred to an iteration's end (``interrupt.py``), and the library's way in
(``pipeline.py``: ``restore``, ``run``). The top of the engine: it may import every other
package of baton, and none of them imports it; ``tasks`` and ``flows`` build on it, and
it never imports Prefect.
"""
