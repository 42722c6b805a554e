"""Prefect flow over the pipeline's stages: retries, timeouts and run history around the same code.

Each stage runs as a task named after the stage, either in-process (``pipeline.stages.<name>.run``)
or, with ``use_dvc``, as ``dvc repro --single-item <name>`` in the project root, so a Prefect run
leaves the same lineage a ``dvc repro`` leaves (``dvc.lock``, outputs in the DVC cache). Stage
functions stay plain functions; they are wrapped into tasks here. The flow runs without a server
(Prefect's ephemeral mode).

    python -m pipeline.flows --root . --stages distill evaluate register --use-dvc
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from components.config import ConfigError
from pipeline import env

# Prefect reads its settings (home folder, ephemeral server timeout, analytics) when imported,
# so the offline defaults go in first: for DISTILLERY_ROOT, else the working folder.
env.configure(os.environ.get("DISTILLERY_ROOT", "."))

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline.stages import STAGES


@dataclass(frozen=True)
class StagePolicy:
    """How a stage's task is retried and when it is given up."""

    retries: int = 1
    retry_delay_s: float = 30.0
    timeout_s: float | None = 3600.0


# distill resumes from its last checkpoint, so a retry costs only the steps since then;
# register talks to a tracking server and is the one most likely to hit a passing outage.
POLICIES: dict[str, StagePolicy] = {
    "bootstrap": StagePolicy(retries=1, retry_delay_s=10, timeout_s=4 * 3600),
    "prepare_prompts": StagePolicy(retries=1, retry_delay_s=5, timeout_s=600),
    "cache_teacher": StagePolicy(retries=1, retry_delay_s=30, timeout_s=4 * 3600),
    "reference_stats": StagePolicy(retries=1, retry_delay_s=30, timeout_s=4 * 3600),
    "distill": StagePolicy(retries=2, retry_delay_s=60, timeout_s=24 * 3600),
    "evaluate": StagePolicy(retries=1, retry_delay_s=30, timeout_s=4 * 3600),
    "register": StagePolicy(retries=3, retry_delay_s=20, timeout_s=900),
}
DEFAULT_POLICY = StagePolicy()


def _module_runner(name: str) -> Callable[[Path], None]:
    """``pipeline.stages.<name>.run``, imported on first use (stages import torch)."""
    def run(root: Path) -> None:
        importlib.import_module(f"pipeline.stages.{name}").run(root)
    run.__name__ = name
    return run


# Stage name → in-process runner. Canonical order first; tests may add entries.
RUNNERS: dict[str, Callable[[Path], None]] = {name: _module_runner(name) for name in STAGES}


class StageFailed(RuntimeError):
    """A stage failed; the message names it and carries the original error."""

    def __init__(self, stage: str, error: BaseException):
        super().__init__(f"stage {stage!r} failed: {type(error).__name__}: {error}")
        self.stage = stage


def select_stages(stages: Sequence[str] | None) -> list[str]:
    """The requested stages (all when None) in pipeline order; unknown names list valid ones."""
    order = list(RUNNERS)
    if stages is None:
        return list(STAGES)
    unknown = [s for s in stages if s not in RUNNERS]
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(map(repr, unknown))}; "
                         f"valid stages are: {', '.join(order)}")
    return sorted(dict.fromkeys(stages), key=order.index)


def dvc_repro(stage: str, root: Path, timeout_s: float | None = None) -> str:
    """Run ``dvc repro --single-item <stage>`` in ``root``; returns its output, raises on failure.

    The stage commands in ``dvc.yaml`` call ``python``: this interpreter's folder is put first on
    ``PATH`` so they run in the same environment.
    """
    bindir = str(Path(sys.executable).parent)
    child_env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    done = subprocess.run(cmd, check=False, cwd=root, env=child_env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"`dvc repro --single-item {stage}` exited with {done.returncode}:\n"
                           f"{done.stdout[-3000:]}")
    return done.stdout


def _run_stage(stage: str, root: str, use_dvc: bool) -> None:
    """Body of every stage task: the stage function in-process, or DVC's reproduction of it."""
    if use_dvc:
        output = dvc_repro(stage, Path(root), POLICIES.get(stage, DEFAULT_POLICY).timeout_s)
        get_run_logger().info("%s", output.strip()[-3000:])
    else:
        RUNNERS[stage](Path(root))


def _retry_unless_config_error(task_, task_run, state) -> bool:
    """A wrong params file fails the same way every time: do not wait to retry it."""
    return not isinstance(getattr(state, "data", None), ConfigError)


def stage_task(stage: str):
    """The Prefect task for ``stage``, with that stage's retries, delay and timeout."""
    policy = POLICIES.get(stage, DEFAULT_POLICY)
    return task(_run_stage, name=stage, task_run_name=stage, retries=policy.retries,
                retry_delay_seconds=policy.retry_delay_s, timeout_seconds=policy.timeout_s,
                retry_condition_fn=_retry_unless_config_error, cache_policy=NO_CACHE)


@flow(name="distillery")
def distillery(root: str = ".", stages: list[str] | None = None,
               use_dvc: bool = False) -> list[str]:
    """Run ``stages`` (default: all) of the project at ``root`` in pipeline order.

    Returns the stages that ran. A failing stage fails the flow with ``StageFailed`` naming it.
    """
    base = Path(root).resolve()
    env.configure(base)
    chosen = select_stages(stages)
    for name in chosen:
        try:
            stage_task(name)(name, str(base), use_dvc)
        except Exception as err:
            raise StageFailed(name, err) from err
    return chosen


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.flows")
    parser.add_argument("--root", type=Path, default=Path("."), help="project root")
    parser.add_argument("--stages", nargs="+", choices=STAGES, help="default: all, in order")
    parser.add_argument("--use-dvc", action="store_true",
                        help="run each stage as `dvc repro --single-item` (records dvc.lock)")
    args = parser.parse_args(argv)
    env.configure(args.root)
    distillery(root=str(args.root.resolve()), stages=args.stages, use_dvc=args.use_dvc)


if __name__ == "__main__":
    main()
