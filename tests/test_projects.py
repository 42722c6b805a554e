"""The throwaway project copy holds what git tracks, not what a previous run left behind."""

from __future__ import annotations

from pathlib import Path

from pipeline.lineage import git_commit
from tests.projects import copy_project, git


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_copy_leaves_out_what_the_main_job_wrote(tmp_path):
    source = tmp_path / "clone"
    _write(source / "dvc.yaml", "stages: {}\n")
    _write(source / "pipeline" / "presets" / "micro.yaml", "evaluate: {num_images: 4}\n")
    _write(source / "components" / "a.py", "A = 1\n")
    git("init", "-q", cwd=source)
    git("add", "-A", cwd=source)
    git("commit", "-qm", "base", cwd=source)
    # what `dvc repro` leaves in a clone: none of it tracked, none of it ignored
    leftovers = ["dvc.lock", "metrics/eval.json", "models/.gitignore", "outputs/.gitignore"]
    for rel in leftovers:
        _write(source / rel, "written by a run\n")
    _write(source / "components" / "a.py", "A = 2\n")  # an edit in progress travels
    _write(source / "components" / "b.py", "B = 1\n")
    git("add", "components/b.py", cwd=source)  # a staged new file travels too
    assert git("status", "--porcelain", "--untracked-files=all", cwd=source).count("??") == 4

    dest = copy_project(tmp_path / "copy", source=source)

    for rel in leftovers:
        assert not (dest / rel).exists(), rel
    assert (dest / "components" / "a.py").read_text() == "A = 2\n"
    assert (dest / "components" / "b.py").is_file()
    assert (dest / "params.yaml").read_text() == "evaluate: {num_images: 4}\n"
    assert git("status", "--porcelain", "--untracked-files=all", cwd=dest) == ""
    # a run in the copy writes its own lock and metrics: the commit must stay clean
    _write(dest / "dvc.lock", "schema: '2.0'\n")
    _write(dest / "metrics" / "eval.json", "{}\n")
    assert not git_commit(dest).endswith("-dirty")
