"""What every stage entry point shares: the root, offline settings, logging, resolved configs."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from components.checkpoint import CheckpointError
from components.config import ConfigError, to_dict
from components.io import CacheError, write_json
from pipeline import env


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def require(path: Path, producer: str) -> Path:
    """``path`` if it exists, else a clear error naming the stage that produces it."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; it is produced by the {producer} stage: "
                                f"run `dvc repro {producer}` first")
    return path


def declared_deps(root: Path, stage: str) -> list[Path] | None:
    """The dependencies ``root/dvc.yaml`` declares for ``stage`` as absolute paths, ``${...}``
    filled in from ``params.yaml`` as DVC does; None when ``root`` has no dvc.yaml."""
    dvc_file = root / "dvc.yaml"
    if not dvc_file.exists():
        return None
    params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")) or {}

    def value(match: re.Match) -> str:
        node = params
        for part in match.group(1).split("."):
            node = node[part]
        return str(node)

    deps = yaml.safe_load(dvc_file.read_text(encoding="utf-8"))["stages"][stage]["deps"]
    return [(root / re.sub(r"\$\{([\w.]+)\}", value, str(d))).resolve() for d in deps]


def undeclared(root: Path, stage: str, files: list[Path]) -> list[Path]:
    """Those of ``files`` that no dependency of ``stage`` in ``root/dvc.yaml`` covers (none
    without a dvc.yaml): DVC would not re-run the stage when they change."""
    deps = declared_deps(root, stage)
    if deps is None:
        return []
    return [f for f in files if not any(f.resolve() == d or d in f.resolve().parents
                                        for d in deps)]


def write_resolved(path: Path, **configs) -> None:
    """The resolved configs of a stage, written next to its outputs."""
    write_json(path, {name: to_dict(cfg) for name, cfg in configs.items()})


# What bad input raises (params, missing or stale upstream outputs, corrupt caches, a checkpoint
# of another run): the message says what is wrong and how to fix it, so the user gets that line
# and no traceback. Every exception class the project defines derives from one of these
# (tests/test_stage_errors.py walks them).
PROJECT_ERRORS = (ConfigError, CacheError, CheckpointError, FileNotFoundError, ValueError,
                  KeyError)
TRACEBACK_ENV = "DISTILLERY_TRACEBACK"  # =1: raise them with their traceback (for debugging)


def entry(run: Callable[[Path], None], name: str) -> None:
    """``main()`` of a stage: parse ``--root``, set offline defaults, turn every project error
    into one clear line and exit code 2."""
    parser = argparse.ArgumentParser(prog=f"python -m pipeline.stages.{name}",
                                     description=(sys.modules["__main__"].__doc__ or "").strip())
    parser.add_argument("--root", type=Path, default=Path("."), help="project root")
    args = parser.parse_args()
    env.configure(args.root)
    try:
        run(args.root.resolve())
    except PROJECT_ERRORS as err:
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        log(f"{name}: error: {message}")
        raise SystemExit(2) from None
