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


def copy_project(dest: Path, preset: str = "micro") -> Path:
    """The project's files as git sees them, with ``pipeline/presets/<preset>.yaml`` as
    ``params.yaml``, committed in a fresh git repo at ``dest``."""
    for rel in git("ls-files", "--cached", "--others", "--exclude-standard", cwd=ROOT).split():
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    shutil.copy(ROOT / "pipeline" / "presets" / f"{preset}.yaml", dest / "params.yaml")
    git("init", "-q", cwd=dest)
    git("add", "-A", cwd=dest)
    git("commit", "-qm", preset, cwd=dest)
    return dest
