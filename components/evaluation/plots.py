"""PNG plots that render offline (DVC's HTML plots load vega from a CDN)."""

from __future__ import annotations

import io
from pathlib import Path

from components.io import atomic_write_bytes


def fid_bars(values: dict[str, float], path: str | Path, title: str = "FID (lower is better)"):
    """A bar chart of FID per model, written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3), dpi=120)
    names = list(values)
    bars = ax.bar(names, [values[n] for n in names], color=["#3b7dd8", "#888888", "#c8c8c8"])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_title(title)
    ax.set_ylabel("FID")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def metric_curves(curves: dict[str, tuple[list[float], list[float]]], path: str | Path,
                  ylabel: str, title: str) -> None:
    """One line per name, ``curves[name] = (steps, values)``, written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=120)
    for name, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
