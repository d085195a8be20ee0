"""The curves of an experiment's history: loss, accuracy and learning rate per epoch, as
a PNG (matplotlib's Agg backend, no display needed).

matplotlib is an optional extra (``pip install baton[plots]``): without it there is no
plot, said in one log line, and everything else goes on.
"""

import functools
import io
import logging
import math
from pathlib import Path

logger = logging.getLogger(__name__)

# The panels and the metrics each draws, in the order a history's records name them.
CURVES = {
    "loss": ("train/loss", "val/loss"),
    "accuracy": ("train/accuracy", "val/accuracy"),
    "learning rate": ("train/lr",),
}
# Small enough to travel inside a markdown artifact (~30-50 kB as base64).
FIGURE_INCHES = (9.0, 2.8)
DPI = 80


@functools.cache
def _pyplot():
    """matplotlib's pyplot on the Agg backend, or None without the optional extra (looked
    up once; the missing extra is logged once)."""
    try:
        import matplotlib
    except ImportError:
        logger.info("matplotlib is not installed: no curves (pip install 'baton[plots]')")
        return None
    matplotlib.use("Agg", force=True)  # no display on a worker; never a GUI backend
    import matplotlib.pyplot as plt

    return plt


def plot_history(history: list[dict]) -> bytes | None:
    """A PNG of ``history``'s curves (the per-epoch records of ``metrics.jsonl``), one
    panel per entry of :data:`CURVES` that the history has values for.

    Returns:
        The PNG's bytes; ``None`` when matplotlib is not installed or the history holds
        none of the curves' metrics.
    """
    panels = {
        title: {key: _series(history, key) for key in keys if _series(history, key)[0]}
        for title, keys in CURVES.items()
    }
    panels = {title: lines for title, lines in panels.items() if lines}
    if not panels:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    from matplotlib.ticker import MaxNLocator  # installed: pyplot was found

    figure, axes = plt.subplots(1, len(panels), figsize=FIGURE_INCHES, squeeze=False)
    try:
        for axis, (title, lines) in zip(axes[0], panels.items(), strict=True):
            for key, (epochs, values) in lines.items():
                axis.plot(epochs, values, marker="o", markersize=3, label=key)
            axis.set_title(title)
            axis.set_xlabel("epoch")
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            axis.grid(alpha=0.3)
            axis.legend(fontsize="small")
            if title == "learning rate" and all(v > 0 for _, vs in lines.values() for v in vs):
                spread = [v for _, vs in lines.values() for v in vs]
                if max(spread) / min(spread) > 50:
                    axis.set_yscale("log")
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=DPI)
    finally:
        plt.close(figure)
    return buffer.getvalue()


def write_plot(history: list[dict], path: str | Path) -> Path | None:
    """Write :func:`plot_history`'s PNG to ``path``; ``None`` (and nothing written) when
    there is no plot."""
    png = plot_history(history)
    if png is None:
        return None
    path = Path(path)
    path.write_bytes(png)
    return path


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """The epochs that have a finite ``key``, and its values."""
    pairs = [
        (r["epoch"], float(r[key]))
        for r in history
        if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
    ]
    return [e for e, _ in pairs], [v for _, v in pairs]
