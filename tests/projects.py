"""A throwaway copy of the project in its own git repo, for tests that run DVC or Prefect on it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
                "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **GIT_IDENTITY},
                          check=True, capture_output=True, text=True).stdout


def tracked_files(source: Path) -> list[str]:
    """Files git tracks in ``source`` (committed or staged), as they are in the working tree.

    Untracked files are left out even when no ``.gitignore`` covers them: a clone where the main
    job already ran holds its ``dvc.lock``, ``metrics/`` and the ``.gitignore`` files DVC writes,
    and a copy carrying them would start with a dirty commit.
    """
    listed = git("ls-files", "--cached", "-z", cwd=source).split("\0")
    return [rel for rel in listed if rel and (source / rel).is_file()]


def copy_project(dest: Path, preset: str = "micro", source: Path = ROOT) -> Path:
    """The files git tracks in ``source``, with ``pipeline/presets/<preset>.yaml`` as
    ``params.yaml``, committed in a fresh git repo at ``dest``."""
    for rel in tracked_files(source):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / rel, dest / rel)
    shutil.copy(source / "pipeline" / "presets" / f"{preset}.yaml", dest / "params.yaml")
    git("init", "-q", cwd=dest)
    git("add", "-A", cwd=dest)
    git("commit", "-qm", preset, cwd=dest)
    return dest


def prepared_project(dest: Path, tmp_path_factory) -> Path:
    """A micro-preset project (``copy_project``) whose stages before distill (bootstrap,
    prepare_prompts, cache_teacher, reference_stats) have run, copied to ``dest``.

    The stages run once per test session, under a lock, in a folder every xdist worker of the
    session shares; each caller gets its own copy, free to change params and run on."""
    import fcntl

    from pipeline.stages import bootstrap, cache_teacher, prepare_prompts, reference_stats

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # this session's
    built = shared / "micro-prepared"
    with open(shared / "micro-prepared.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first process builds, the others wait for it
        if not (built / ".prepared").exists():
            shutil.rmtree(built, ignore_errors=True)
            built.mkdir()
            copy_project(built)
            for stage in (bootstrap, prepare_prompts, cache_teacher, reference_stats):
                stage.run(built)
            (built / ".prepared").touch()
    shutil.copytree(built, dest, symlinks=True, ignore=shutil.ignore_patterns(".prepared"))
    return dest
