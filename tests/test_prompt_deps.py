"""Every file prepare_prompts reads is a DVC dependency: editing a text prompt source under
data/sources/ makes `dvc status` report the stage and `dvc repro` pick up the new prompt; a
source outside every declared dependency is refused with the fix. Run for real by DVC."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.projects import GIT_IDENTITY, copy_project, git

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _dvc(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **GIT_IDENTITY}
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, check=False)
    assert not check or proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _coco(path: Path, captions: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": [{"id": i} for i in range(len(captions))],
                                "annotations": [{"id": i, "image_id": i, "caption": c}
                                                for i, c in enumerate(captions)]}))


def _sources(root: Path, *paths: str) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["prompts"]["train_sources"] = [params["prompts"]["train_sources"][0],
                                          *({"kind": "text", "path": p} for p in paths)]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture()
def project(tmp_path):
    root = copy_project(tmp_path / "p")
    # the world's caption files stand in for bootstrap's output: only prepare_prompts runs
    _coco(root / "data/world/train/captions.json", ["a red circle", "a blue square"])
    _coco(root / "data/world/eval/captions.json", ["a green triangle"])
    return root


def test_editing_a_text_source_reruns_prepare_prompts(project):
    (project / "data/sources/mine.txt").write_text("a purple hexagon\n")
    _sources(project, "data/sources/mine.txt")
    git("add", "-A", cwd=project)
    git("commit", "-qm", "my prompts", cwd=project)
    _dvc("repro", "--single-item", "prepare_prompts", cwd=project)
    assert "a purple hexagon" in (project / "data/prompts/train.txt").read_text()
    with open(project / "data/sources/mine.txt", "a") as f:
        f.write("a golden star\n")
    status = json.loads(_dvc("status", "--json", "prepare_prompts", cwd=project).stdout)
    assert "prepare_prompts" in status, status
    _dvc("repro", "--single-item", "prepare_prompts", cwd=project)
    assert "a golden star" in (project / "data/prompts/train.txt").read_text()


def test_a_source_outside_the_declared_dependencies_is_refused(project):
    (project / "mine.txt").write_text("a purple hexagon\n")
    _sources(project, "mine.txt")
    proc = _dvc("repro", "--single-item", "prepare_prompts", cwd=project, check=False)
    assert proc.returncode != 0
    assert ("mine.txt is not a dependency of prepare_prompts in dvc.yaml" in proc.stderr
            and "move it under data/sources/" in proc.stderr), proc.stderr[-2000:]
    assert not (project / "data/prompts").exists()


def test_the_params_check_refuses_an_undeclared_source_before_any_stage_runs(project):
    (project / "mine.txt").write_text("a purple hexagon\n")
    _sources(project, "mine.txt")
    proc = subprocess.run([sys.executable, "-m", "pipeline.params", "--check"], cwd=project,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert ("params: error: prompts.train_sources[1].path: mine.txt is not a dependency of "
            "prepare_prompts in dvc.yaml" in proc.stderr), proc.stderr
    assert "move it under data/sources/" in proc.stderr
    (project / "data/sources/mine.txt").write_text("a purple hexagon\n")
    _sources(project, "data/sources/mine.txt")
    proc = subprocess.run([sys.executable, "-m", "pipeline.params", "--check"], cwd=project,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
