"""The distill stage's run folders ``checkpoints/distill/<run key>/``: which run a checkpoint
belongs to, what a run records across its segments (killed and resumed, or extended), and how
many runs are kept.

The run key covers everything the student's weights depend on: the resolved teacher, distill
and method configs, the hashes of the teacher's weights and of the embedding and pair caches,
and the source code of the distill stage (the ``.py`` files of its code dependencies in
``dvc.yaml``). It leaves out what only changes how often the loop logs, samples and checkpoints,
what it monitors, and how long it runs: extending ``loop.steps`` resumes the run. Methods whose
phases are fractions of ``loop.steps`` (InstaFlow: reflow, then distillation; Meng et al.: stage 1,
then the halving rounds) are the exception: there the update at step k depends on the run length,
so a longer run is another run from step 0, and ``loop.steps`` is part of their key.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import yaml

from components.io import atomic_write_text, read_json, sha256_bytes, sha256_file, write_json

CADENCE_KEYS = ("log_every", "sample_every", "checkpoint_every")  # of distill.loop
MONITOR_KEYS = ("sample_prompts", "sample_seed", "proxy_fid_images", "keep_runs",
                "monitor", "save")  # of distill: watching a run (or which of its
# checkpoints becomes the student) does not change it
# checkpoints reshard, and the update does not depend on the process count: a run saved with N
# processes resumes with M
PLACEMENT_KEYS = ("processes",)
STEP_PHASED = ("instaflow", "meng")  # methods whose phase boundaries are fractions of steps
CODE_ROOTS = ("components", "pipeline")  # dvc.yaml deps under these are code
CODE_ROOT = Path(__file__).resolve().parents[1]  # the project whose code is running
ROWS_FILE, CLOCK_FILE, SAMPLES = "rows.jsonl", "clock.json", "samples"
BEST_WEIGHTS, BEST_FILE = "best.safetensors", "best.json"


def code_hash(code_root: Path = CODE_ROOT, stage: str = "distill") -> str:
    """sha256 of the ``.py`` files (relative path and content) of ``stage``'s code dependencies
    in ``code_root/dvc.yaml``; without a dvc.yaml, of every ``.py`` file under ``CODE_ROOTS``."""
    dvc_file = code_root / "dvc.yaml"
    if dvc_file.exists():
        deps = yaml.safe_load(dvc_file.read_text(encoding="utf-8"))["stages"][stage]["deps"]
        roots = [code_root / d for d in deps if str(d).split("/")[0] in CODE_ROOTS]
    else:
        roots = [code_root / d for d in CODE_ROOTS]
    files = sorted({p for r in roots for p in ([r] if r.is_file() else r.rglob("*.py"))
                    if p.suffix == ".py"})
    listing = "\n".join(f"{p.relative_to(code_root).as_posix()} {sha256_file(p)}" for p in files)
    return sha256_bytes(listing.encode())


def run_key(resolved: dict, method: str) -> str:
    """16 hex digits naming the run: ``resolved`` holds the configs (``teacher``, ``distill``,
    ``method_config`` as dicts) and the input and code hashes; cadence, monitoring and (unless
    the method's phases depend on it) run-length keys are left out."""
    distill = {k: v for k, v in resolved["distill"].items()
               if k not in MONITOR_KEYS + PLACEMENT_KEYS and k != "methods"}  # method_config
    leave_out = CADENCE_KEYS + (() if method in STEP_PHASED else ("steps",))
    distill["loop"] = {k: v for k, v in distill["loop"].items() if k not in leave_out}
    keyed = {**resolved, "distill": distill}
    return sha256_bytes(json.dumps(keyed, sort_keys=True).encode())[:16]


def prune_runs(folder: Path, keep: int, current: str) -> list[str]:
    """Delete all but the ``keep`` most recently active run folders under ``folder`` (``current``
    always stays); returns the deleted names. Call it only once ``current`` holds a checkpoint."""
    others = [p for p in folder.iterdir() if p.is_dir() and p.name != current]
    others.sort(key=_last_active, reverse=True)
    gone = others[max(0, keep - 1):]
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
    return sorted(p.name for p in gone)


def _last_active(path: Path) -> float:
    clock = path / CLOCK_FILE
    return (clock if clock.exists() else path).stat().st_mtime


class RunRecord:
    """What a run logs, kept in its folder across segments: the loss and proxy-FID rows
    (``rows.jsonl``, appended as they come), the sample grids and the wall time of every
    segment. A resumed segment drops the rows after the step it resumes from (it logs them again) and keeps
    everything before; grids are kept (resuming is exact, so a grid of step k is the same in
    every segment that reaches k)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.samples = folder / SAMPLES
        self.samples.mkdir(parents=True, exist_ok=True)
        path = folder / ROWS_FILE
        self.rows = ([json.loads(line) for line in path.read_text().splitlines() if line]
                     if path.exists() else [])
        clock = read_json(folder / CLOCK_FILE) if (folder / CLOCK_FILE).exists() else {}
        self.before = clock.get("earlier_s", 0.0) + clock.get("segment_s", 0.0)
        self.started = time.perf_counter()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.folder / ROWS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")

    def resume_from(self, step: int) -> None:
        """Forget what earlier segments logged after ``step`` (it is about to be redone)."""
        earlier = [r for r in self.rows if r["step"] <= step]
        self.rows = earlier
        atomic_write_text(self.folder / ROWS_FILE,
                          "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows))

    def tick(self) -> None:
        """Record this segment's wall time so far (a later segment adds it to its own)."""
        write_json(self.folder / CLOCK_FILE, {"earlier_s": self.before,
                                              "segment_s": self.segment_seconds()})

    def segment_seconds(self) -> float:
        return time.perf_counter() - self.started

    def wall_seconds(self) -> float:
        """Wall time of every segment of the run, this one included."""
        return self.before + self.segment_seconds()


def best_row(rows: list[dict]) -> dict | None:
    """The sample row with the lowest proxy FID (the later one on a tie), or None."""
    scored = [r for r in rows if "proxy_fid" in r]
    return min(reversed(scored), key=lambda r: r["proxy_fid"]) if scored else None


class BestStudent:
    """The student's weights (its EMA, as sampled) at the lowest proxy FID of the run so far,
    kept in the run's folder (``best.safetensors`` and ``best.json``: step and proxy FID).

    ``offer`` is called at every sample step with the FID just measured and the rows logged
    before it; it keeps the weights when none of those rows scored lower. Resuming is exact, so
    a segment that redoes a step offers the same weights again. ``load_into`` gives the student
    the weights of the run's best row and refuses when the kept file is not that row's (a run
    resumed on other hardware, whose redone steps differ)."""

    def __init__(self, folder: Path):
        self.weights, self.meta = folder / BEST_WEIGHTS, folder / BEST_FILE

    def offer(self, student, proxy_fid: float, step: int, earlier: list[dict]) -> bool:
        from safetensors.torch import save_model

        best = best_row([r for r in earlier if r["step"] < step])
        if best is not None and proxy_fid > best["proxy_fid"]:
            return False
        partial = self.weights.with_suffix(".partial")
        save_model(student, str(partial))
        partial.replace(self.weights)
        write_json(self.meta, {"step": step, "proxy_fid": proxy_fid})
        return True

    def load_into(self, student, rows: list[dict]) -> dict:
        """Load the best row's weights into ``student`` (strictly); returns that row."""
        from safetensors.torch import load_model

        best = best_row(rows)
        if best is None:
            raise ValueError("distill.save: best needs the proxy FID of the run's samples, and "
                             "this run logged none: set distill.proxy_fid_images >= 2")
        kept = read_json(self.meta) if self.meta.exists() and self.weights.exists() else None
        if kept != {"step": best["step"], "proxy_fid": best["proxy_fid"]}:
            raise ValueError(
                f"distill.save: best: the run's lowest proxy FID is {best['proxy_fid']} at step "
                f"{best['step']}, but the weights kept in {self.weights.parent.name}/ are "
                f"{'none' if kept is None else 'of step ' + str(kept['step'])} (a segment that "
                "redid steps on other hardware): use distill.save: last, or train the run "
                "again after deleting its checkpoint folder")
        load_model(student, str(self.weights), strict=True)
        return best
