"""Which method and params won: compare DVC experiments or MLflow runs in one table, with plots
of FID and CLIP score over distillation steps (one line per variant).

    uv run python -m pipeline.compare                       # DVC experiments of this repo
    uv run python -m pipeline.compare --source mlflow       # runs of the register experiment
    uv run dvc exp run -S distill.loop.steps=100,200,300 --queue && uv run dvc exp run --run-all
    uv run python -m pipeline.compare --out reports/compare # also writes compare.md and PNGs
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from components.comparison import NOISE_MULTIPLE, comparison_table, flatten, plot_over_steps
from components.io import atomic_write_text
from components.registry.gate import TAG_PROTOCOL
from pipeline import env, paths
from pipeline.lineage import TAG_EXPERIMENT, dvc
from pipeline.params import PARAMS_FILE

PLOTS = (("fid", "FID", "fid_over_steps.png"), ("clip_score", "CLIP score",
                                                 "clip_over_steps.png"))


def dvc_rows(root: Path) -> list[dict[str, Any]]:
    """One row per DVC experiment (and per baseline commit) that has evaluation metrics."""
    shown = json.loads(dvc(root, "exp", "show", "--all-commits", "--json"))
    rows = []
    for baseline in shown:
        if baseline["rev"] == "workspace":
            continue
        entries = [(baseline.get("name") or baseline["rev"], baseline)]
        for exp in baseline.get("experiments") or []:
            entries += [(rev.get("name") or rev["rev"], rev) for rev in exp["revs"]]
        for name, entry in entries:
            row = _dvc_row(name, entry)
            if row is not None:
                rows.append(row)
    return rows


def _dvc_row(name: str, entry: dict) -> dict[str, Any] | None:
    data = entry.get("data") or {}
    params = ((data.get("params") or {}).get(PARAMS_FILE) or {}).get("data")
    metrics = ((data.get("metrics") or {}).get(paths.EVAL_METRICS.as_posix()) or {}).get("data")
    if not params or not metrics or "student" not in metrics:
        return None
    return {"name": name, "rev": entry["rev"], "params": flatten(params),
            "metrics": metrics["student"], "protocol": metrics.get("protocol")}


def mlflow_rows(uri: str, experiment: str) -> list[dict[str, Any]]:
    """One row per finished MLflow run of ``experiment`` that logged FID and CLIP score."""
    from components.registry.store import find_runs

    rows = []
    for run in find_runs(uri, experiment):
        if not {"fid", "clip_score"} <= set(run["metrics"]):
            continue
        name = run["tags"].get(TAG_EXPERIMENT) or f"{run['run_name']}-{run['run_id'][:8]}"
        rows.append({"name": name, "rev": run["run_id"], "params": run["params"],
                     "metrics": run["metrics"], "protocol": run["tags"].get(TAG_PROTOCOL)})
    return rows


def write_report(rows: list[dict[str, Any]], out: Path | None,
                 noise_multiple: float = NOISE_MULTIPLE) -> str:
    """The table (differences inside ``noise_multiple`` standard errors marked); with ``out``,
    also ``compare.md`` and the two plots in that folder."""
    table = comparison_table(rows, noise_multiple)
    if out is not None:
        for metric, label, name in PLOTS:
            plot_over_steps(rows, metric, out / name, label)
        figures = "\n".join(f"![{label} over steps]({name})" for _, label, name in PLOTS)
        atomic_write_text(out / "compare.md", f"# Variants\n\n{table}\n{figures}\n")
    return table


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.compare")
    parser.add_argument("--root", type=Path, default=Path("."), help="project root")
    parser.add_argument("--source", choices=("dvc", "mlflow"), default="dvc")
    parser.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else "
                        "sqlite:///<root>/mlflow.db")
    parser.add_argument("--experiment", help="MLflow experiment (default: register.experiment)")
    parser.add_argument("--out", type=Path, help="folder for compare.md and the PNG plots")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    env.configure(root)
    try:
        if args.source == "dvc":
            rows = dvc_rows(root)
        else:
            from components.registry.store import tracking_uri

            rows = mlflow_rows(args.tracking_uri or tracking_uri(root),
                               args.experiment or _register(root).get("experiment")
                               or "distillery")
    except (RuntimeError, ValueError) as err:
        raise SystemExit(f"compare: {err}") from None
    if not rows:
        raise SystemExit(f"compare: no {args.source} runs with evaluation metrics found; run "
                         "`dvc exp run` (or the nightly flow) first")
    noise = float(_register(root).get("noise_multiple") or NOISE_MULTIPLE)
    sys.stdout.write(write_report(rows, args.out, noise))


def _register(root: Path) -> dict:
    """The ``register`` params section (experiment name, the gate's noise multiple)."""
    path = root / PARAMS_FILE
    data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    return (data or {}).get("register") or {}


if __name__ == "__main__":
    main()
