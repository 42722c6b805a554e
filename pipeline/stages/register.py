"""Stage register: log the run to MLflow, register the student, alias it ``candidate`` and
promote it to ``champion`` only if the promotion gate says it beats the current champion."""

from __future__ import annotations

import subprocess
from pathlib import Path

from components.io import read_json, sha256_file, write_json
from components.registry.gate import Lineage
from components.registry.store import artifact_location, register_student, tracking_uri
from pipeline import paths
from pipeline.params import PARAMS_FILE, load_stage, read_params
from pipeline.stages.common import entry, log, require


def git_commit(root: Path) -> str:
    """HEAD's commit, with ``-dirty`` when tracked files differ from it; ``unknown`` outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def run(root: Path) -> None:
    cfg = load_stage(root, "register")["register"]
    evaluation = read_json(require(root / paths.EVAL_METRICS, "evaluate"))
    student_meta = read_json(require(root / paths.STUDENT / "student.json", "distill"))
    lineage = Lineage(git_commit=git_commit(root), method=student_meta["method"],
                      teacher=student_meta["teacher"],
                      params_hash=sha256_file(root / PARAMS_FILE)[:16],
                      eval_protocol=evaluation["protocol"])
    metrics = {**evaluation["student"], "teacher": evaluation["teacher"],
               "teacher_1step": evaluation["teacher_1step"],
               "distill": read_json(root / paths.DISTILL_METRICS)}
    uri = tracking_uri(root)
    artifacts = [root / paths.EVAL_OUT, root / paths.DISTILL_OUT, root / PARAMS_FILE]
    artifacts += [p for p in (root / "dvc.lock", root / paths.LOSS_PLOT) if p.exists()]
    result = register_student(cfg, root / paths.STUDENT, metrics, lineage, uri=uri,
                              artifact_root=artifact_location(root, uri),
                              params=read_params(root), artifacts=artifacts)
    write_json(root / paths.REGISTER_OUT, result)
    verdict = "promoted to champion" if result["promoted"] else "not promoted"
    log(f"register: {cfg.model_name} version {result['version']} is candidate; {verdict} "
        f"({result['reason']})")


def main() -> None:
    entry(run, "register")


if __name__ == "__main__":
    main()
