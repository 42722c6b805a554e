"""PNG plots that render offline (DVC's HTML plots load vega from a CDN)."""

from __future__ import annotations

import io
from pathlib import Path

from components.io import atomic_write_bytes


def figure(size: tuple[float, float]):
    """A new (figure, axes) on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size, dpi=120)


def write_png(fig, path: str | Path) -> None:
    """Lay out, render and atomically write ``fig`` as PNG; the figure is closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def fid_bars(values: dict[str, float], path: str | Path, title: str = "FID (lower is better)"):
    """A bar chart of FID per model, written as PNG."""
    fig, ax = figure((4.5, 3))
    names = list(values)
    bars = ax.bar(names, [values[n] for n in names], color=["#3b7dd8", "#888888", "#c8c8c8"])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_title(title)
    ax.set_ylabel("FID")
    write_png(fig, path)


def fid_clip_curve(points: list[dict], path: str | Path, marks: dict[str, dict] | None = None,
                   title: str = "FID-CLIP over guidance scale"):
    """FID (x) against CLIP score (y), one point per guidance scale, joined in scale order;
    ``marks`` adds labelled single points (e.g. the student). Written as PNG."""
    fig, ax = figure((4.5, 3.2))
    points = sorted(points, key=lambda p: p["guidance_scale"])
    ax.plot([p["fid"] for p in points], [p["clip_score"] for p in points], "o-", color="#3b7dd8",
            label="teacher")
    for p in points:
        ax.annotate(f"s={p['guidance_scale']:g}", (p["fid"], p["clip_score"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    for name, m in (marks or {}).items():
        ax.plot([m["fid"]], [m["clip_score"]], "s", label=name)
    ax.set_xlabel("FID (lower is better)")
    ax.set_ylabel("CLIP score (higher is better)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    write_png(fig, path)


def metric_curves(curves: dict[str, tuple[list[float], list[float]]], path: str | Path,
                  ylabel: str, title: str, xlabel: str = "iteration", grid: bool = False,
                  figsize: tuple[float, float] = (5.5, 3.5)) -> None:
    """One line per name, ``curves[name] = (steps, values)``, written as PNG."""
    fig, ax = figure(figsize)
    for name, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if grid:
        ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    write_png(fig, path)
