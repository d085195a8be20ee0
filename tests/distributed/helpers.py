"""Runs on several processes: configs, the ranks' processes, and the comparison of runs."""

import os
import uuid
from pathlib import Path

from baton.checkpoint import io
from baton.checkpoint.store import CheckpointStore
from baton.config import load_config

from ..baton.helpers import small_pipeline

# The environment variable that marks the processes a test started (its ranks inherit it).
MARK = "BATON_TEST_MARK"


def config(
    work_dir: Path,
    nproc: int,
    *,
    name: str = "ddp",
    dropout: float = 0.2,
    model: dict | None = None,
    **overrides,
):
    """The tiny pipeline (256 samples, batch 32 per process) on ``nproc`` processes."""
    raw = small_pipeline(work_dir, name, model)
    raw["model"].setdefault("dropout", dropout)
    if model is None:
        raw["model"]["dropout"] = dropout
    raw["launcher"] = {"nproc": nproc}
    return load_config(raw, overrides)


def latest(cfg) -> dict:
    """The newest committed checkpoint of the config's experiment, loaded whole."""
    ref = CheckpointStore(Path(cfg.work_dir) / cfg.experiment_name).latest()
    assert ref is not None, "no checkpoint"
    return io.load(ref.uri)


def losses(checkpoint: dict) -> list[float]:
    return [h["train/loss"] for h in checkpoint["meta"]["history"]]


def max_weight_difference(a: dict, b: dict) -> float:
    return max(
        (a["state_dict"][k] - b["state_dict"][k]).abs().max().item() for k in a["state_dict"]
    )


def marked_environment() -> str:
    """Mark this process's environment, so that the processes it starts can be found."""
    mark = uuid.uuid4().hex
    os.environ[MARK] = mark
    return mark


def processes_marked(mark: str, *, rank: int | None = None) -> list[int]:
    """The pids of live processes whose environment carries ``mark`` (and ``RANK=rank``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            status = (entry / "status").read_text()
        except OSError:
            continue
        if "State:\tZ" in status:
            continue
        if f"{MARK}={mark}".encode() not in environ:
            continue
        if rank is not None and f"RANK={rank}".encode() not in environ:
            continue
        found.append(int(entry.name))
    return found
