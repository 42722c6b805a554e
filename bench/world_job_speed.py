"""The default world job at two (or more) commits, stage by stage, on this machine.

    python -m bench.world_job_speed --revs e40a93d HEAD --from . --steps 50
    python -m bench.world_job_speed --revs e40a93d HEAD --from . --concurrent   # a busy machine

Answers "is the world job as fast as before?" with both commits measured on the same machine:
each revision is cloned from this repository into ``--workdir``, installed from its own lock
(``uv sync --frozen --compile-bytecode``), given the world and teacher of ``--from`` (a project
where ``bootstrap`` ran, so both train on identical inputs and the bootstrap is not re-timed),
and runs its own ``prepare_prompts``, ``cache_teacher``, ``reference_stats`` and ``distill``
stages with its own ``params.yaml``, ``distill.loop.steps`` set to ``--steps``. Each stage is
timed from process start to exit (imports included), and the distill stage's log gives the
seconds per iteration of its loop (the last tqdm rate). ``--concurrent`` runs the revisions'
distill stages side by side, so that on a machine shared with other work both see the same load.
Prints a Markdown table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path

import yaml

PREP = ("prepare_prompts", "cache_teacher", "reference_stats")
WORLD = (Path("data/world"), Path("models/teacher"))


def _run(cmd: list[str], cwd: Path, log: Path | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen, what: str, log: Path | None = None) -> None:
    if proc.wait() != 0:
        tail = log.read_text(errors="replace")[-3000:] if log else ""
        raise SystemExit(f"world_job_speed: {what} failed (exit {proc.returncode})\n{tail}")


def checkout(repo: Path, rev: str, dest: Path, source: Path, steps: int) -> str:
    """A clone of ``repo`` at ``rev`` in ``dest``, installed, with ``source``'s world; returns
    the full commit."""
    if dest.exists():
        shutil.rmtree(dest)
    _wait(_run(["git", "clone", "-q", str(repo), str(dest)], repo), f"git clone of {rev}")
    _wait(_run(["git", "checkout", "-q", rev], dest), f"git checkout {rev}")
    _wait(_run(["uv", "sync", "--frozen", "--compile-bytecode"], dest), f"uv sync at {rev}")
    for rel in WORLD:
        shutil.copytree(source / rel, dest / rel)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["distill"]["loop"]["steps"] = steps
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=dest, check=True,
                          capture_output=True, text=True).stdout.strip()


def _stage(dest: Path, stage: str) -> subprocess.Popen:
    return _run([str(dest / ".venv/bin/python"), "-m", f"pipeline.stages.{stage}"], dest,
                dest / f"{stage}.log")


def seconds_per_step(log: Path) -> float | None:
    """The distill loop's last tqdm rate (``12.3s/step`` or ``1.2step/s``)."""
    text = log.read_text(errors="replace")
    rates = re.findall(r"([\d.]+)(s/step|step/s)\]", text)
    if not rates:
        return None
    value, unit = rates[-1]
    return float(value) if unit == "s/step" else 1.0 / float(value)


def measure(dests: dict[str, Path], concurrent: bool) -> dict[str, dict[str, float]]:
    """Wall seconds of each stage per revision (preparation stages one revision at a time)."""
    times: dict[str, dict[str, float]] = {rev: {} for rev in dests}
    for rev, dest in dests.items():
        for stage in PREP:
            start = time.perf_counter()
            _wait(_stage(dest, stage), f"{stage} at {rev}", dest / f"{stage}.log")
            times[rev][stage] = time.perf_counter() - start
    order = [list(dests)] if concurrent else [[rev] for rev in dests]
    for group in order:
        start = time.perf_counter()
        running = {rev: _stage(dests[rev], "distill") for rev in group}
        while running:  # each stage's own end, whichever finishes first
            for rev, proc in list(running.items()):
                if proc.poll() is not None:
                    times[rev]["distill"] = time.perf_counter() - start
                    _wait(running.pop(rev), f"distill at {rev}", dests[rev] / "distill.log")
            time.sleep(0.5)
    return times


def table(rows: list[dict]) -> str:
    stages = [*PREP, "distill"]
    lines = ["| revision | commit | " + " | ".join(f"{s} (s)" for s in stages)
             + " | total (s) | loop s/step |",
             "| --- | --- |" + " --- |" * (len(stages) + 2)]
    for r in rows:
        rate = f"{r['seconds_per_step']:.2f}" if r["seconds_per_step"] else "–"
        lines.append(f"| {r['rev']} | {r['commit'][:8]} | "
                     + " | ".join(f"{r['seconds'][s]:.0f}" for s in stages)
                     + f" | {sum(r['seconds'].values()):.0f} | {rate} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revs", nargs="+", required=True, help="git revisions to compare")
    parser.add_argument("--from", dest="source", type=Path, default=Path("."),
                        help="a project where bootstrap ran (data/world, models/teacher)")
    parser.add_argument("--steps", type=int, default=50, help="distill.loop.steps for every rev")
    parser.add_argument("--concurrent", action="store_true",
                        help="run the distill stages side by side (same load for each)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/distillery-world-job-speed"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/world_job_speed.json"))
    args = parser.parse_args(argv)
    source = args.source.resolve()
    missing = [str(rel) for rel in WORLD if not (source / rel).is_dir()]
    if missing:
        raise SystemExit(f"world_job_speed: {source} has no {', '.join(missing)}; run "
                         "`uv run dvc repro bootstrap` there first (or pass --from)")
    if args.steps < 1:
        raise SystemExit(f"world_job_speed: --steps must be at least 1, got {args.steps}")
    repo = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], check=True, text=True,
                               capture_output=True).stdout.strip())
    dests = {rev: args.workdir / re.sub(r"[^\w.-]", "_", rev) for rev in args.revs}
    commits = {rev: checkout(repo, rev, dest, source, args.steps) for rev, dest in dests.items()}
    times = measure(dests, args.concurrent)
    rows = [{"rev": rev, "commit": commits[rev], "seconds": times[rev],
             "seconds_per_step": seconds_per_step(dests[rev] / "distill.log")} for rev in dests]
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores visible",
        "python": platform.python_version(), "steps": args.steps,
        "concurrent": args.concurrent, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
