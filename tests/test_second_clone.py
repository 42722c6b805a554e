"""The README's reproduction in a second clone, run for real by DVC on the micro preset: a clone at
another path pulls the first clone's DVC cache, removes the checkpoints and re-derives the student
with `dvc repro --force --single-item distill`. Its `dvc.lock` holds the first clone's hashes:
every input, the student, the distill outputs and plots that later stages read; only what is
not cached and records a wall clock (``metrics/distill.json``, the run's checkpoint folder)
differs. The evaluation stages are left out (the distill stage is what the README re-derives)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.projects import GIT_IDENTITY, copy_project, git

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow
TIMED = {"metrics/distill.json", "checkpoints/distill"}  # wall seconds, clock.json: not compared


def _dvc(*args: str, cwd: Path) -> str:
    # one torch thread in both clones: the same float sums (bit-identical at the same count)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **GIT_IDENTITY,
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return proc.stdout


def _without_stages(root: Path, drop: list[str]) -> None:
    """Leave ``drop`` out of ``dvc.yaml`` (committed), as if the project stopped at distill."""
    import yaml

    dag = yaml.safe_load((root / "dvc.yaml").read_text())
    for stage in drop:
        dag["stages"].pop(stage)
    (root / "dvc.yaml").write_text(yaml.safe_dump(dag, sort_keys=False))
    git("commit", "-qam", "up to distill", cwd=root)


def _lock(root: Path) -> dict:
    """Per stage: its deps, params and outs as path -> hash, the timed outputs left out."""
    import yaml

    stages = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {name: {"deps": {d["path"]: d.get("md5") for d in stage.get("deps", [])},
                   "params": stage.get("params"),
                   "outs": {o["path"]: o.get("md5") for o in stage.get("outs", [])
                            if o["path"] not in TIMED}}
            for name, stage in stages.items()}


def test_second_clone_rederives_the_student_with_the_first_clones_lock(tmp_path):
    first = copy_project(tmp_path / "first")
    _without_stages(first, ["evaluate", "register"])
    _dvc("repro", cwd=first)
    git("add", "-A", cwd=first)
    git("commit", "-qm", "repro", cwd=first)
    lock = _lock(first)

    second = tmp_path / "elsewhere" / "deeper" / "second"
    second.parent.mkdir(parents=True)
    git("clone", "-q", str(first), str(second), cwd=tmp_path)
    _dvc("remote", "add", "--local", "-d", "origin", str(first / ".dvc" / "cache"), cwd=second)
    _dvc("pull", cwd=second)  # the student and every stage's inputs
    shutil.rmtree(second / "checkpoints", ignore_errors=True)
    _dvc("repro", "--force", "--single-item", "distill", cwd=second)

    assert json.loads(_dvc("status", "--json", cwd=second)) == {}
    again = _lock(second)
    assert again == lock  # the first clone's hashes
    assert set(again["distill"]["outs"]) == {"models/student", "outputs/distill",
                                             "plots/distill_loss.csv", "plots/distill_fid.csv"}
    saved = [p for p in (second / "models/student").rglob("*.json")]
    saved += [p for p in (second / "outputs/distill").rglob("*.json")]
    assert saved and not [p for p in saved if str(tmp_path) in p.read_text()]
