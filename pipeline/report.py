"""Render the metrics of the last run as a markdown table (for the README or a review); the
summary of a registered run (Prefect's metrics artifact) adds where it went in MLflow and DVC.

    uv run python -m pipeline.report --root . [--out reports/results.md]
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

from components.io import atomic_write_text, read_json
from pipeline import paths

ROWS = (("teacher", "teacher, DDIM with CFG"), ("student", "distilled student"),
        ("teacher_1step", "untrained student (teacher at 1 step)"),
        ("real_renders", "floor: real renders of the captions"),
        ("vae_reconstruction", "floor: the teacher VAE's reconstructions of them"))
ATTRIBUTES = ("colour", "shape", "size", "position", "background", "all")


def results_table(root: Path) -> str:
    """Markdown: FID, CLIP score, attribute accuracy and latency per model, then run facts."""
    ev = read_json(root / paths.EVAL_METRICS)
    lines = [("| model | steps | FID ↓ ± s.e. | CLIP score ↑ ± s.e. | attribute accuracy "
             f"({' / '.join(ATTRIBUTES)}) | latency, batch 1 |"),
             "| --- | --- | --- | --- | --- | --- |"]
    for key, label in ROWS:
        if key not in ev:  # the floors exist only under the world protocol
            continue
        row = ev[key]
        acc = row.get("attribute_accuracy", {})
        accs = " / ".join(f"{acc[a]:.2f}" for a in ATTRIBUTES if a in acc) if acc else "n/a"
        guide = f", s = {row['guidance_scale']:g}" if row.get("guidance_scale", 1.0) != 1.0 else ""
        steps = f"{row['steps']}{guide}" if row["steps"] else "–"
        latency = f"{row['latency_s'] * 1000:.1f} ms" if "latency_s" in row else "–"
        lines.append(f"| {label} | {steps} | {_pm(row, 'fid', '.1f')} | "
                     f"{_pm(row, 'clip_score', '.3f')} | {accs} | {latency} |")
    lines.append("")
    lines += _facts(root, ev)
    lines.append("- ± one standard error: delete-half jackknife over the generated images "
                 "(`components/evaluation/uncertainty.py`)")
    return "\n".join(lines) + "\n"


def run_summary(root: Path, registered: dict, recorded: dict[str, str] | None = None) -> str:
    """Markdown: the registered version, its MLflow run, the DVC experiment, then the results."""
    run = registered["run_id"]
    link = f"[{run}]({registered['run_url']})" if registered.get("run_url") else f"`{run}`"
    verdict = "promoted to champion" if registered["promoted"] else "not promoted"
    lines = [f"# {registered['model_name']} version {registered['version']}", "",
             f"- MLflow run {link} at `{registered['tracking_uri']}`",
             (f"- alias `candidate`; {verdict}: {registered['reason']}; champion: "
              + (f"version {registered['champion']}" if registered["champion"] else "none"))]
    if registered.get("review_page"):
        lines.append(f"- review page `{registered['review_page']}` (MLflow artifact "
                     f"`{registered.get('review_artifact')}`)")
    if recorded:
        lines.append(f"- DVC experiment `{recorded.get('dvc_experiment')}` "
                     f"(rev `{recorded.get('dvc_exp_rev')}`)")
    return "\n".join(lines) + "\n\n" + results_table(root)


def _pm(row: dict, key: str, fmt: str) -> str:
    std = row.get(f"{key}_std")
    return format(row[key], fmt) + ("" if std is None else f" ± {std:{fmt}}")


def _facts(root: Path, ev: dict) -> list[str]:
    facts = [(f"- protocol `{ev['protocol']}`; machine: {platform.machine()}, "
             f"{_cpu_count()} CPU threads visible")]
    boot = root / paths.BOOTSTRAP_METRICS
    if boot.exists():
        b = read_json(boot)
        chance = b.get("chance", {})
        facts.append("- attribute chance levels: " + ", ".join(
            f"{a} {chance[a]:.2f}" for a in ATTRIBUTES if a in chance))
        facts.append(f"- bootstrap (render + VAE + UNet + check): {b['total_seconds']:.0f} s; "
                     f"VAE PSNR {b['vae']['psnr']:.1f} dB; scorer retrieval top-1 "
                     f"{b['scorer']['retrieval_top1']:.2f}")
    dist = root / paths.DISTILL_METRICS
    if dist.exists():
        d = read_json(dist)
        facts.append(f"- distillation: {d['steps']} steps, {d['images_seen']} images seen, "
                     f"{d['wall_seconds']:.0f} s")
    return facts


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.report")
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    table = results_table(args.root)
    print(table)
    if args.out:
        atomic_write_text(args.out, table)


if __name__ == "__main__":
    main()
