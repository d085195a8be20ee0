"""An experiment's metrics log (``metrics.jsonl``) and the table it prints as.

One JSON record a line, appended: ``kind`` ``'epoch'`` (the metrics after an epoch) or
``'iteration'`` (running train metrics every ``log_interval`` iterations). A run that
resumes appends again; readers take the last record of each epoch, and skip a line a
crash cut short.
"""

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

from baton.markdown import table_cell

# Keys of a record that are not metrics.
_NOT_METRICS = ("time", "kind", "epoch", "iter")


class MetricsLog:
    """The ``metrics.jsonl`` of one experiment (see the module docstring).

    Args:
        path: The file.
        before_write: Called before each record is written; it raises to refuse the write
            (the experiment's check that its folder is still where the run locked it).
    """

    def __init__(self, path: str | Path, *, before_write: Callable[[], None] | None = None):
        self.path = Path(path)
        self._before_write = before_write

    def append(self, kind: str, record: dict) -> None:
        """Append one record (``kind`` is ``'epoch'`` or ``'iteration'``)."""
        if self._before_write is not None:
            self._before_write()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"time": time.time(), "kind": kind, **record}, sort_keys=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")

    def epochs(self) -> list[dict]:
        """The last record of each epoch, in epoch order (lines cut by a crash skipped)."""
        if not self.path.exists():
            return []
        by_epoch: dict[int, dict] = {}
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("kind") == "epoch":
                by_epoch[record["epoch"]] = record
        return [by_epoch[e] for e in sorted(by_epoch)]


def metric_keys(history: list[dict]) -> list[str]:
    """The metric names of a history, as its newest record has them."""
    return [k for k in history[-1] if k not in _NOT_METRICS] if history else []


def history_table(history: list[dict], *, markdown: bool = False) -> str:
    """Epoch-by-epoch metrics as a table: aligned text (the CLI) or markdown (artifacts).

    A metric an epoch lacks (validated every few epochs) is ``nan`` in text, empty in
    markdown.
    """
    if not history:
        return "(no epochs recorded)"
    keys = metric_keys(history)
    header = ["epoch", *keys]
    rows = [[str(r["epoch"]), *(_cell(r.get(k), markdown) for k in keys)] for r in history]
    if markdown:
        header = [table_cell(h) for h in header]
        lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = [header, *rows]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in lines)


def _cell(value, markdown: bool) -> str:
    if markdown:
        return (
            f"{value:.4f}"
            if isinstance(value, float)
            else ("" if value is None else table_cell(value))
        )
    return f"{math.nan if value is None else value:.4f}"
