"""Where a run's student came from: the git commit it started at and the DVC experiment that
records its params, ``dvc.lock`` and metrics (outputs live in the DVC cache).

``dvc exp apply <rev>`` (or ``git checkout <rev>``) followed by ``dvc checkout`` gives the saved
student back; ``dvc repro`` re-derives it from the same params and lock.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

TAG_EXPERIMENT = "dvc_experiment"
TAG_EXPERIMENT_REV = "dvc_exp_rev"


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                          check=True).stdout.strip()


def git_commit(root: Path) -> str:
    """HEAD's commit, with ``-dirty`` when tracked files differ from it; ``unknown`` outside git."""
    try:
        commit = _git(root, "rev-parse", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def experiment_name(prefix: str, when: datetime | None = None) -> str:
    """``<prefix>-YYYYmmdd-HHMMSS`` (UTC): a valid, sortable DVC experiment name."""
    when = (when or datetime.now(UTC)).astimezone(UTC)
    return f"{prefix}-{when:%Y%m%d-%H%M%S}"


def dvc(root: Path, *args: str, timeout_s: float | None = 600) -> str:
    """Run ``dvc <args>`` in ``root`` with this interpreter; returns stdout, raises on failure."""
    bindir = str(Path(sys.executable).parent)
    child_env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=child_env,
                          capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"`dvc {' '.join(args)}` exited with {done.returncode}:\n"
                           f"{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout


def save_experiment(root: Path, name: str) -> str:
    """Save the workspace as DVC experiment ``name``; returns its git revision.

    Untracked files that git does not ignore (``dvc.lock``, metrics, ``outputs/register.json``)
    are included, so the experiment holds everything a commit of the run would.
    """
    try:
        untracked = _git(root, "ls-files", "--others", "--exclude-standard").splitlines()
    except (subprocess.CalledProcessError, FileNotFoundError):
        raise RuntimeError(f"{root} is not a git repository with a commit; a run is recorded as "
                           "a DVC experiment on top of one (git init && git commit)") from None
    includes = [arg for path in untracked for arg in ("-I", path)]
    out = dvc(root, "exp", "save", "--json", "-n", name, *includes)
    return json.loads(out)["ref"]
