"""The review page of a registered version: one self-contained HTML file (images as data URIs,
curves as inline SVG, no scripts, nothing fetched) that a reviewer opens before promoting.

It shows the candidate beside the champion: the same captions and seeds side by side with each
caption under its images, the metrics with their standard errors and whether each difference is
inside the noise, the gate's verdict, the loss and proxy-FID curves over distillation steps, and
the lineage of both versions. Pure text; ``review_store`` gathers the inputs and logs the page.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from components.evaluation.samples import Samples
from components.registry.gate import noise_of_difference

PAGE_FILE = "review.html"
CELL_PX = 96  # displayed size of one sample image
# (metric key, label, format, lower is better)
METRICS = (("fid", "FID", "{:.2f}", True), ("clip_score", "CLIP score", "{:.4f}", False))
LINEAGE_TAGS = ("method", "teacher", "git_commit", "params_hash", "eval_protocol",
                "dvc_experiment", "dvc_exp_rev")
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
Curve = tuple[Sequence[float], Sequence[float]]  # (steps, values)


@dataclass(frozen=True)
class Side:
    """One version on the page: ``metrics`` flat (``fid``, ``fid_std``, ``teacher.fid``, ...),
    ``tags`` its lineage, ``samples`` its evaluation's images, ``curves`` per chart
    (``"loss"``, ``"proxy_fid"``) a curve per series."""

    version: str
    metrics: Mapping[str, Any]
    tags: Mapping[str, str]
    samples: Samples | None = None
    curves: Mapping[str, Mapping[str, Curve]] = field(default_factory=dict)


def review_page(model_name: str, candidate: Side, champion: Side | None, promoted: bool,
                reason: str, noise_multiple: float) -> str:
    """The page as one HTML string."""
    title = f"{model_name} version {candidate.version}"
    against = f"champion version {champion.version}" if champion else "no champion yet"
    body = [f"<h1>{_e(title)}</h1>", f"<p class=sub>candidate beside {_e(against)}</p>",
            _verdict(promoted, reason), "<h2>Samples</h2>", _samples(candidate, champion),
            "<h2>Metrics</h2>", _metrics(candidate, champion, noise_multiple),
            "<h2>Distillation curves</h2>", _curves(candidate, champion),
            "<h2>Lineage</h2>", _lineage(candidate, champion)]
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n")


STYLE = (
    "body{font:14px/1.4 sans-serif;margin:24px;color:#111;background:#fff}"
    "h1{font-size:22px;margin:0}h2{font-size:17px;margin:28px 0 8px}.sub{color:#555;margin:2px 0}"
    ".verdict{padding:8px 12px;border-radius:4px;margin:12px 0}"
    ".promote{background:#e3f4e3}.keep{background:#fbeee0}"
    ".samples{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}"
    ".samples figure{margin:0;width:" + str(CELL_PX) + "px}"
    ".samples img{display:block;width:" + str(CELL_PX) + "px;height:" + str(CELL_PX) + "px;"
    "image-rendering:pixelated;margin-bottom:2px}"
    ".samples figcaption{font-size:11px;line-height:1.25}.labels span{display:block;height:"
    + str(CELL_PX + 2) + "px;line-height:" + str(CELL_PX) + "px;font-size:12px}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
    ".noise{color:#777}.out{font-weight:bold}.charts{display:flex;flex-wrap:wrap;gap:16px}"
)


def png_data_uri(image: np.ndarray) -> str:
    """A uint8 image ``(H, W, 3)`` as a ``data:image/png;base64,...`` URI."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _verdict(promoted: bool, reason: str) -> str:
    head = "promoted to champion" if promoted else "stays candidate"
    css = "promote" if promoted else "keep"
    return f"<div class='verdict {css}'><b>gate: {head}</b> &mdash; {_e(reason)}</div>"


def _samples(candidate: Side, champion: Side | None) -> str:
    """Columns of images for one caption and seed each (candidate, champion, teacher), the
    caption written under them."""
    ours = candidate.samples
    if ours is None:
        return "<p>the candidate's evaluation wrote no samples</p>"
    rows = [(f"candidate v{candidate.version}", ours.rows.get("student"))]
    theirs = champion.samples if champion else None
    if theirs is not None and theirs.same_prompts(ours):
        rows.append((f"champion v{champion.version}", theirs.rows.get("student")))
    rows.append(("teacher", ours.rows.get("teacher")))
    rows = [(label, images) for label, images in rows if images is not None]
    note = ""
    if champion is not None and (theirs is None or not theirs.same_prompts(ours)):
        note = ("<p class=noise>the champion's evaluation has no samples for these captions and "
                "seeds; only the candidate is shown</p>")
    labels = "".join(f"<span>{_e(label)}</span>" for label, _ in rows)
    figures = [f"<figure class=labels>{labels}</figure>"]
    for i, (caption, seed) in enumerate(zip(ours.captions, ours.seeds, strict=True)):
        imgs = "".join(f"<img alt='{_e(label)}: {_e(caption)}' src='{png_data_uri(images[i])}'>"
                       for label, images in rows)
        figures.append(f"<figure>{imgs}<figcaption>{_e(caption)} "
                       f"<span class=noise>(seed {seed})</span></figcaption></figure>")
    return note + f"<div class=samples>{''.join(figures)}</div>"


def _metrics(candidate: Side, champion: Side | None, k: float) -> str:
    head = ["", f"candidate v{candidate.version}"]
    if champion:
        head += [f"champion v{champion.version}", "candidate − champion"]
    head += ["teacher", "teacher, 1 step"]
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for key, label, fmt, lower in METRICS:
        cells = [f"{label} {'↓' if lower else '↑'} ± s.e.", _pm(candidate.metrics, key, fmt)]
        if champion:
            cells += [_pm(champion.metrics, key, fmt),
                      _difference(candidate.metrics, champion.metrics, key, fmt, k)]
        cells += [_pm(candidate.metrics, f"teacher.{key}", fmt),
                  _pm(candidate.metrics, f"teacher_1step.{key}", fmt)]
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</table><p class=noise>± one standard error (delete-half jackknife over the "
               f"generated images); a difference is inside the noise within {k:g} standard "
               "errors of the difference</p>")
    return "".join(out)


def _difference(ours: Mapping[str, Any], theirs: Mapping[str, Any], key: str, fmt: str,
                k: float) -> str:
    a, b = _number(ours.get(key)), _number(theirs.get(key))
    if a is None or b is None:
        return "—"
    noise = noise_of_difference(ours, theirs, key)
    text = ("+" if a >= b else "") + fmt.format(a - b)
    if noise is None:
        return f"{text} <span class=noise>(noise not measured)</span>"
    if abs(a - b) <= k * noise:
        return f"{text} ± {fmt.format(noise)} <span class=noise>inside the noise</span>"
    return f"<span class=out>{text} ± {fmt.format(noise)}</span> outside the noise"


def _curves(candidate: Side, champion: Side | None) -> str:
    charts = []
    for chart, ylabel in (("loss", "loss"), ("proxy_fid", "proxy FID")):
        series = {f"v{candidate.version} {name}": c
                  for name, c in candidate.curves.get(chart, {}).items()}
        if champion:
            series.update({f"v{champion.version} {name}": c
                           for name, c in champion.curves.get(chart, {}).items()})
        if series:
            charts.append(svg_chart(series, f"{ylabel} over steps", "distillation step", ylabel))
    return (f"<div class=charts>{''.join(charts)}</div>" if charts
            else "<p>no curves were logged</p>")


def svg_chart(series: Mapping[str, Curve], title: str, xlabel: str, ylabel: str,
              width: int = 420, height: int = 260) -> str:
    """A line chart as inline SVG: one polyline per series, axis ranges, a legend."""
    points = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys, strict=True)
              if _number(x) is not None and _number(y) is not None]
    if not points:
        return ""
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    left, right, top, bottom = 56, 12, 24, 36
    sx = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)
    sy = lambda y: height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)
    out = [(f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
           f"role='img' aria-label='{_e(title)}'><text x='{left}' y='15' font-size='13'>"
           f"{_e(title)}</text>"),
           (f"<rect x='{left}' y='{top}' width='{width - left - right}' "
           f"height='{height - top - bottom}' fill='none' stroke='#999'/>")]
    for value, y in ((y1, top + 4), (y0, height - bottom)):
        out.append(f"<text x='{left - 4}' y='{y}' font-size='10' text-anchor='end'>"
                   f"{value:.4g}</text>")
    for value, anchor in ((x0, "start"), (x1, "end")):
        out.append(f"<text x='{sx(value):.1f}' y='{height - bottom + 13}' font-size='10' "
                   f"text-anchor='{anchor}'>{value:g}</text>")
    out.append(f"<text x='{(left + width - right) / 2}' y='{height - 6}' font-size='11' "
               f"text-anchor='middle'>{_e(xlabel)}</text>")
    for i, (label, (xs, ys)) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys, strict=True))
        out.append(f"<polyline fill='none' stroke='{colour}' stroke-width='1.5' "
                   f"points='{line}'/><text x='{left + 6}' y='{top + 14 + 13 * i}' "
                   f"font-size='10' fill='{colour}'>{_e(label)}</text>")
    return "".join(out) + "</svg>"


def _lineage(candidate: Side, champion: Side | None) -> str:
    sides = [candidate, *([champion] if champion else [])]
    head = "".join(f"<th>v{s.version}</th>" for s in sides)
    rows = [f"<tr><td>{_e(tag)}</td>" + "".join(f"<td><code>{_e(s.tags.get(tag, '—'))}</code>"
                                                 "</td>" for s in sides) + "</tr>"
            for tag in LINEAGE_TAGS if any(tag in s.tags for s in sides)]
    return f"<table><tr><th></th>{head}</tr>{''.join(rows)}</table>"


def _pm(metrics: Mapping[str, Any], key: str, fmt: str) -> str:
    value, std = _number(metrics.get(key)), _number(metrics.get(f"{key}_std"))
    if value is None:
        return "—"
    return fmt.format(value) + ("" if std is None else f" ± {fmt.format(std)}")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return None
    value = float(value)
    return value if np.isfinite(value) else None


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def curves_from_csv(loss_csv: str | Path | None, fid_csv: str | Path | None
                    ) -> dict[str, dict[str, Curve]]:
    """The distill stage's ``step,...`` CSVs as chart series: every ``loss*`` column of the loss
    file, and ``proxy_fid``; a missing file gives no series."""
    out: dict[str, dict[str, Curve]] = {}
    for chart, path, wanted in (("loss", loss_csv, lambda c: c.startswith("loss")),
                                ("proxy_fid", fid_csv, lambda c: c == "proxy_fid")):
        if path is None or not Path(path).is_file():
            continue
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        columns = [c for c in (rows[0].keys() if rows else ()) if c != "step" and wanted(c)]
        series = {}
        for column in columns:
            pairs = [(float(r["step"]), float(r[column])) for r in rows if r.get(column)]
            if pairs:
                series[column] = ([p[0] for p in pairs], [p[1] for p in pairs])
        if series:
            out[chart] = series
    return out
