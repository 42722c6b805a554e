"""Distil every method at equal compute and write ``reports/methods.md``.

    uv run python -m pipeline.methods_report [--methods swiftbrush,dmd2,dmd2@4] [--out reports]

Each method runs as a DVC experiment of the current params (``dvc exp run -S
distill.method=<m> -n methods-<m>``): the upstream stages come from the DVC cache, so only
distill, evaluate and register run, with the same loop (iterations, batch) for every method.
``<m>@N`` is the method's N-step student (``-S distill.methods.<m>.generator_steps=N``, experiment
``methods-<m>-<N>step``; the score methods). ``--add-to reports/methods.json`` adds the new rows
to an earlier run's (a row of the same variant is replaced) and writes the report from all of
them; each row keeps the commit it ran at, and the report lists them.
Afterwards ``dvc exp show`` lists the experiments side by side, and the report holds a table
(FID and CLIP score with their standard errors, attribute accuracies, wall time, images seen;
the floors and the teacher above the methods) and a plot of the in-training proxy FID per
method. ``params.yaml`` is restored at the end. ``--results reports/methods.json`` writes the
report again from a finished run's results, without running anything.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
from pathlib import Path

from components.comparison import NOISE_MULTIPLE, inside_noise, with_noise
from components.evaluation.plots import metric_curves
from components.io import atomic_write_text, read_json, write_json
from components.methods import method_names
from pipeline import paths
from pipeline.params import PARAMS_FILE

FEW_STEP = ("swiftbrush", "sid_lsg", "dmd2")  # methods with a generator_steps setting


def parse_variant(text: str) -> tuple[str, int]:
    """``"dmd2"`` → (dmd2, 1); ``"dmd2@4"`` → (dmd2, 4): a method and its generator steps."""
    method, _, steps = text.partition("@")
    if method not in method_names():
        raise ValueError(f"unknown method {method!r} in {text!r}; valid methods are: "
                         f"{', '.join(method_names())}")
    if not steps:
        return method, 1
    if not steps.isdigit() or int(steps) < 1:
        raise ValueError(f"{text!r}: the step count after @ must be a positive integer")
    if int(steps) > 1 and method not in FEW_STEP:
        raise ValueError(f"{text!r}: few-step students are trained by {', '.join(FEW_STEP)} "
                         f"(distill.methods.<m>.generator_steps), not {method}")
    return method, int(steps)


def label(method: str, steps: int) -> str:
    return method if steps == 1 else f"{method}, {steps}-step"


def run_experiment(root: Path, method: str, steps: int = 1) -> dict:
    """One DVC experiment for ``method`` (``steps``: its generator's step count); return its
    metrics, proxy-FID curve and the commit it ran at."""
    name = f"methods-{method}" + (f"-{steps}step" if steps > 1 else "")
    cmd = ["dvc", "exp", "run", "-S", f"distill.method={method}"]
    if steps > 1:
        cmd += ["-S", f"distill.methods.{method}.generator_steps={steps}"]
    cmd += ["-n", name]
    print("+", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=root, check=False)
    if done.returncode != 0:
        raise SystemExit(f"methods_report: the experiment for {label(method, steps)!r} failed "
                         f"(exit {done.returncode}); its log is above")
    ev, dist = read_json(root / paths.EVAL_METRICS), read_json(root / paths.DISTILL_METRICS)
    curve: tuple[list[float], list[float]] = ([], [])
    fid_csv = root / paths.PROXY_FID_PLOT
    if fid_csv.exists():
        for row in csv.DictReader(fid_csv.open()):
            if row.get("proxy_fid"):
                curve[0].append(float(row["step"]))
                curve[1].append(float(row["proxy_fid"]))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, check=False,
                            capture_output=True, text=True).stdout.strip() or None
    return {"method": method, "generator_steps": steps, "label": label(method, steps),
            "commit": commit, "eval": ev, "distill": dist, "proxy_fid": curve}


def _label(result: dict) -> str:
    return result.get("label") or result["method"]  # rows of reports written before variants


def merge(earlier: list[dict], new: list[dict]) -> list[dict]:
    """``earlier`` with ``new`` added; a new row replaces an earlier one of the same variant."""
    replaced = {_label(r) for r in new}
    return [r for r in earlier if _label(r) not in replaced] + new


# What the analytic tier establishes about the methods (tests/test_methods_analytic.py and the
# tests named below); part of every report so that world numbers are read with it.
ANALYTIC = """## On exact teachers (the analytic tier)

Every method reaches its exact target on two Gaussian problems (2-D and anisotropic 3-D) from
three training seeds, each student starting four tolerances away (`tests/test_methods_analytic.py`).
Meng et al.'s stage-1 student follows the teacher's guidance at w = 0, 0.5, 1 and 2 within 0.1
(`tests/test_meng_stage1.py`). SwiftBrush at its published CFG 4.5, on a teacher whose empty prompt
is the mixture of its classes (as a text-to-image model's is), converges to the teacher's
*conditional* distribution, not to the CFG target: with the same guidance on the teacher and on the
LoRA teacher, q_c = p_c is VSD's fixed point whatever the scale, and the scale only changes the path
(`tests/test_swiftbrush_guidance.py`; the SwiftBrush module docstring has the argument)."""


ATTRIBUTES = ("colour", "shape", "size", "position", "all")
FLOORS = (("real_renders", "floor: real renders"),
          ("vae_reconstruction", "floor: teacher VAE's reconstructions"),
          ("teacher", "teacher (DDIM, CFG)"),
          ("teacher_1step", "untrained student (teacher, 1 step)"))


def _row(label: str, metrics: dict, marks: str = "", wall: str = "–", seen: str = "–") -> str:
    """One table row: FID and CLIP score with their standard errors, attribute accuracies."""
    attrs = metrics.get("attribute_accuracy") or {}
    steps = metrics.get("steps")
    cells = [f"{label}{marks}", str(steps) if steps else "–",  # floors generate nothing
             with_noise(metrics, "fid", "{:.1f}"),
             with_noise(metrics, "clip_score", "{:.3f}") if "clip_score" in metrics else "–",
             *(f"{attrs[a]:.2f}" if a in attrs else "–" for a in ATTRIBUTES), wall, seen]
    return "| " + " | ".join(cells) + " |"


def report(results: list[dict], out: Path) -> str:
    """The markdown report (and its plot) from the experiments' results: FID and CLIP score with
    their standard errors (the evaluation's delete-half jackknife), ``≈`` on a method whose FID
    is inside the noise of the best one's, and the world's attribute accuracies."""
    first = results[0]["eval"]
    d0 = results[0]["distill"]
    intro = (f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores visible, "
             f"Python {platform.python_version()}. Every method ran {d0['steps']} iterations "
             f"of batch {d0['images_seen'] // d0['steps']}; evaluation protocol "
             f"`{first['protocol']}` (FID against the held-out reference renders, CLIP score "
             "with the world's scorer, attribute accuracy by the world's judge). Values are "
             f"± one standard error; ≈ marks a FID within {NOISE_MULTIPLE:g} standard errors "
             "of the best method's (inside the noise, not a loss); * marks the best.")
    commits = sorted({r.get("commit") or "not recorded" for r in results})
    if len(commits) > 1:
        intro += " Rows ran at different commits: " + "; ".join(
            f"{c}: {', '.join(_label(r) for r in results if (r.get('commit') or 'not recorded') == c)}"
            for c in commits) + "."
    lines = ["# Methods on the miniature world, at equal compute", "", intro, "",
             ("| model | steps | FID ↓ | CLIP score ↑ | colour | shape | size | position | all "
              "attributes | distill wall time | images seen |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [_row(label, first[key]) for key, label in FLOORS if key in first]
    best = min(results, key=lambda r: r["eval"]["student"]["fid"])["eval"]["student"]
    for r in results:
        st, d = r["eval"]["student"], r["distill"]
        marks = " *" if st is best else (" ≈" if inside_noise(st, best, "fid") else "")
        lines.append(_row(_label(r), st, marks, f"{d['wall_seconds']:.0f} s",
                          str(d["images_seen"])))
    curves = {_label(r): r["proxy_fid"] for r in results if r["proxy_fid"][0]}
    if curves:
        metric_curves(curves, out / "methods_fid.png", "proxy FID",
                      "in-training proxy FID (training prompts)")
        note = ("The curve is the distill stage's proxy FID (student images of training "
                "prompts against the same reference statistics), not the evaluation protocol.")
        lines += ["", "![proxy FID over iterations](methods_fid.png)", "", note]
    return "\n".join(lines + ["", ANALYTIC]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(method_names()),
                        help="comma-separated methods (default: all); <method>@N for its "
                             "N-step student (swiftbrush, sid_lsg, dmd2)")
    parser.add_argument("--add-to", type=Path, default=None,
                        help="an earlier run's methods.json: the report holds its rows and the "
                             "new ones (a new row replaces one of the same variant)")
    parser.add_argument("--root", default=".", type=Path)
    parser.add_argument("--out", default="reports", type=Path)
    parser.add_argument("--results", type=Path, default=None,
                        help="write the report from a finished run's methods.json instead of "
                             "running the experiments again")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    out = root / args.out
    if args.results is not None:
        if not args.results.is_file():
            sys.exit(f"--results {args.results}: no such file (a methods.json that "
                     "`python -m pipeline.methods_report` wrote)")
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "methods.md", report(read_json(args.results), out))
        print(f"wrote {out / 'methods.md'} from {args.results}")
        return
    try:
        variants = [parse_variant(m) for m in args.methods.split(",") if m]
    except ValueError as err:
        sys.exit(f"--methods: {err}")
    if args.add_to is not None and not args.add_to.is_file():
        sys.exit(f"--add-to {args.add_to}: no such file (a methods.json that "
                 "`python -m pipeline.methods_report` wrote)")
    earlier = read_json(args.add_to) if args.add_to is not None else []  # read before a rewrite
    params = (root / PARAMS_FILE).read_text()
    try:
        results = merge(earlier, [run_experiment(root, m, n) for m, n in variants])
    finally:
        (root / PARAMS_FILE).write_text(params)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "methods.md", report(results, out))
    write_json(out / "methods.json", results)
    print(f"wrote {out / 'methods.md'}; compare with `dvc exp show`")


if __name__ == "__main__":
    main()
