"""Compare distillation variants: runs (DVC experiments or MLflow runs) as rows of params and
metrics, grouped into variants by the params that differ, as a markdown table and as plots of
FID and CLIP score over training steps (one line per variant).

A row is a plain dict: ``name``, ``rev`` (git rev or MLflow run id), ``params`` (flat, dotted
keys), ``metrics`` (flat: at least ``fid`` and ``clip_score``, and their standard errors
``fid_std`` and ``clip_score_std`` when measured) and ``protocol``. A value is shown with its
standard error; a run whose difference from the best is within ``noise_multiple`` standard errors
of that difference is marked ``≈``: inside the noise, not a loss.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from components.evaluation.plots import metric_curves

STEPS = "distill.loop.steps"
METHOD = "distill.method"
METRICS = (("fid", "FID ↓", "{:.2f}"), ("clip_score", "CLIP score ↑", "{:.4f}"))
# Params that say how a number was measured, not what was trained: when they differ between rows,
# FID and CLIP score are not comparable.
PROTOCOL_SECTIONS = ("evaluate.", "reference.")
NOISE_MULTIPLE = 2.0  # the promotion gate's default (register.noise_multiple)


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping to dotted keys: ``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _text(value: Any) -> str:
    """Params compare as text: MLflow stores them as strings, DVC as YAML values."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def varying_params(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Param keys whose values differ between rows (a key missing in a row counts as a value)."""
    keys = sorted({k for row in rows for k in row["params"]})
    return [k for k in keys if len({_text(row["params"].get(k)) for row in rows}) > 1]


def variant_label(row: Mapping[str, Any], varying: Sequence[str]) -> str:
    """What distinguishes a row's variant, training steps aside: method plus varying params."""
    parts = [_text(row["params"].get(METHOD, "?"))]
    parts += [f"{k.rsplit('.', 1)[-1]}={_text(row['params'].get(k))}"
              for k in varying if k not in (STEPS, METHOD)]
    return ", ".join(parts)


def steps_of(row: Mapping[str, Any]) -> float:
    value = row["params"].get(STEPS)
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def comparison_table(rows: Sequence[Mapping[str, Any]],
                     noise_multiple: float = NOISE_MULTIPLE) -> str:
    """Markdown: one line per run (variant, steps, FID, CLIP score, protocol), the best in bold
    and runs inside its noise marked ``≈``, then which run won, which are tied with it within the
    noise, and the params that differ."""
    varying = varying_params(rows)
    shown = [k for k in varying if k not in (STEPS, METHOD)]
    head = ["run", "rev", "method", *shown, "steps", *(m[1] for m in METRICS), "protocol"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    best = {key: _best(rows, key, lower=(key == "fid")) for key, _, _ in METRICS}
    for row in sorted(rows, key=lambda r: (variant_label(r, varying), steps_of(r))):
        cells = [row["name"], f"`{str(row['rev'])[:8]}`", _text(row["params"].get(METHOD, ""))]
        cells += [_text(row["params"].get(k, "")) for k in shown]
        cells.append(_text(row["params"].get(STEPS, "")))
        for key, _, fmt in METRICS:
            value = with_noise(row["metrics"], key, fmt)
            if row is best[key]:
                value = f"**{value}**"
            elif inside_noise(row["metrics"], best[key]["metrics"], key, noise_multiple):
                value = f"≈ {value}"
            cells.append(value)
        cells.append(str(row.get("protocol") or ""))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [f"- {title}: {_describe(best[key], varying)}"
              f"{_ties(rows, best[key], key, noise_multiple)}"
              for key, title in (("fid", "lowest FID"), ("clip_score", "highest CLIP score"))]
    lines += [(f"- ≈: within {noise_multiple:g} standard errors of the best (the difference is "
              "inside the noise); ± is one standard error"),
              f"- params that differ: {', '.join(varying) or 'none'}"]
    protocols = {row.get("protocol") for row in rows}
    if len(protocols) > 1 or any(k.startswith(PROTOCOL_SECTIONS) for k in varying):
        lines.append("- WARNING: the runs were evaluated under different protocols; their FID "
                     "and CLIP scores are not comparable")
    return "\n".join(lines) + "\n"


def with_noise(metrics: Mapping[str, Any], key: str, fmt: str) -> str:
    """``value ± std`` (``fmt`` for both) or the value alone when its noise is not measured."""
    std = _number(metrics.get(f"{key}_std"))
    value = fmt.format(metrics[key])
    return value if std is None else f"{value} ± {fmt.format(std)}"


def inside_noise(a: Mapping[str, Any], b: Mapping[str, Any], key: str,
                 noise_multiple: float = NOISE_MULTIPLE) -> bool:
    """Whether ``a[key] - b[key]`` is within ``noise_multiple`` standard errors of the
    difference; False when neither side measured its noise."""
    stds = [_number(m.get(f"{key}_std")) for m in (a, b)]
    known = [s for s in stds if s is not None]
    if not known:
        return False
    noise = math.hypot(*(s if s is not None else known[0] for s in stds))
    return abs(a[key] - b[key]) <= noise_multiple * noise


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _ties(rows: Sequence[Mapping[str, Any]], best: Mapping[str, Any], key: str,
          noise_multiple: float) -> str:
    tied = [r["name"] for r in rows
            if r is not best and inside_noise(r["metrics"], best["metrics"], key, noise_multiple)]
    return f"; inside its noise: {', '.join(tied)}" if tied else ""


def _best(rows: Sequence[Mapping[str, Any]], key: str, lower: bool) -> Mapping[str, Any]:
    return (min if lower else max)(rows, key=lambda r: r["metrics"][key])


def _describe(row: Mapping[str, Any], varying: Sequence[str]) -> str:
    return f"{row['name']} ({variant_label(row, varying)}, {_text(row['params'].get(STEPS))} steps)"


def plot_over_steps(rows: Sequence[Mapping[str, Any]], metric: str, path: str | Path,
                    ylabel: str) -> None:
    """PNG: ``metric`` against training steps, one line (sorted by steps) per variant."""
    varying = varying_params(rows)
    variants: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        variants.setdefault(variant_label(row, varying), []).append(
            (steps_of(row), row["metrics"][metric]))
    curves = {label: tuple(map(list, zip(*sorted(points), strict=True)))
              for label, points in sorted(variants.items())}
    metric_curves(curves, path, ylabel, f"{ylabel} over steps", xlabel="distillation steps",
                  grid=True, figsize=(6, 3.6))
