"""Flow tests' configs (the session's Prefect harness is in tests/conftest.py)."""

from baton.config import load_config

from ..baton.helpers import small_pipeline


def small_config(work_dir, name="exp", model=None, **overrides) -> dict:
    """A tiny pipeline on synthetic data (8 iterations per epoch), as a resolved dict."""
    return load_config(small_pipeline(work_dir, name, model), overrides).model_dump(mode="json")
