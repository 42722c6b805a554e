"""Prefect flow over the pipeline's stages: retries, timeouts and run history around the same code.

Each stage runs as a task named after the stage, either in-process (``pipeline.stages.<name>.run``)
or, with ``use_dvc``, as ``dvc repro --single-item <name>`` in the project root, so a Prefect run
leaves the same lineage a ``dvc repro`` leaves (``dvc.lock``, outputs in the DVC cache). Stage
functions stay plain functions; they are wrapped into tasks here.

Around the stages: a ``configure`` task writes ``params.yaml`` from a preset, teacher, method and
overrides; a ``check_params`` task validates all of it before the first stage; a ``record`` task saves the run as a DVC experiment and tags the MLflow run with it.
GPU stages hold one slot of the global concurrency limit ``distillery-gpu`` (1 slot), so two runs
never share the GPU. A run that registered a student publishes Prefect artifacts: a markdown
table of its metrics and a link to its MLflow run. A failed run names the failing stage.

    python -m pipeline.flows --root . --stages distill evaluate register --use-dvc
    python -m pipeline.flows --root . --use-dvc --preset micro --experiment try
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.config import ConfigError
from components.monitor import ALARM_PREFIX, TrainingAlarm
from pipeline import env

# Prefect reads its settings (home folder, ephemeral server timeout, analytics) when imported,
# so the offline defaults go in first: for DISTILLERY_ROOT, else the working folder.
env.configure(os.environ.get("DISTILLERY_ROOT", "."))

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components.io import read_json
from pipeline import lineage, paths
from pipeline.stages import STAGES

GPU_LIMIT = "distillery-gpu"  # Prefect global concurrency limit held by every GPU stage


@dataclass(frozen=True)
class StagePolicy:
    """How a stage's task is retried and when it is given up; ``gpu`` stages hold a GPU slot."""

    retries: int = 1
    retry_delay_s: float = 30.0
    timeout_s: float | None = 3600.0
    gpu: bool = False


# distill resumes from its last checkpoint, so a retry costs only the steps since then;
# register talks to a tracking server and is the one most likely to hit a passing outage.
POLICIES: dict[str, StagePolicy] = {
    "bootstrap": StagePolicy(retries=1, retry_delay_s=10, timeout_s=4 * 3600, gpu=True),
    "prepare_prompts": StagePolicy(retries=1, retry_delay_s=5, timeout_s=600),
    "cache_teacher": StagePolicy(retries=1, retry_delay_s=30, timeout_s=4 * 3600, gpu=True),
    "reference_stats": StagePolicy(retries=1, retry_delay_s=30, timeout_s=4 * 3600, gpu=True),
    "distill": StagePolicy(retries=2, retry_delay_s=60, timeout_s=24 * 3600, gpu=True),
    "evaluate": StagePolicy(retries=1, retry_delay_s=30, timeout_s=4 * 3600, gpu=True),
    "register": StagePolicy(retries=3, retry_delay_s=20, timeout_s=900),
}
DEFAULT_POLICY = StagePolicy()
# The steps around the stages: writing params.yaml, checking it, recording the run as a DVC
# experiment.
CONFIGURE_POLICY = StagePolicy(retries=0, timeout_s=300)
CHECK_POLICY = StagePolicy(retries=0, timeout_s=300)
RECORD_POLICY = StagePolicy(retries=2, retry_delay_s=10, timeout_s=600)


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
        alarm = [line for line in done.stdout.splitlines() if ALARM_PREFIX in line]
        if alarm:  # the stage's own one-line error: the run stopped itself, not a crash
            raise TrainingAlarm(alarm[-1][alarm[-1].index(ALARM_PREFIX):])
        raise RuntimeError(f"`dvc repro --single-item {stage}` exited with {done.returncode}:\n"
                           f"{done.stdout[-3000:]}")
    return done.stdout


def ensure_gpu_limit(slots: int | None = None) -> None:
    """Create the ``distillery-gpu`` concurrency limit (1 slot) if it is missing; with ``slots``,
    set its size (e.g. 2 on a machine with two GPUs)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        if slots is not None:
            client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, slots)
            return
        try:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another run created it meanwhile
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=1))


def gpu_slot(stage: str):
    """A context holding one ``distillery-gpu`` slot for a GPU stage (waiting for it if taken)."""
    if not POLICIES.get(stage, DEFAULT_POLICY).gpu:
        return contextlib.nullcontext()
    from prefect.concurrency.sync import concurrency

    return concurrency(GPU_LIMIT, occupy=1, strict=True)


def _run_stage(stage: str, root: str, use_dvc: bool) -> None:
    """Body of every stage task: the stage function in-process, or DVC's reproduction of it."""
    if use_dvc:
        output = dvc_repro(stage, Path(root), POLICIES.get(stage, DEFAULT_POLICY).timeout_s)
        get_run_logger().info("%s", output.strip()[-3000:])
    else:
        RUNNERS[stage](Path(root))


def _retry_unless_config_error(task_, task_run, state) -> bool:
    """A wrong params file fails the same way every time, and so does a run the training
    monitor stopped (a retry resumes from its last checkpoint and meets the same step): do not
    wait to retry them."""
    return not isinstance(getattr(state, "data", None), (ConfigError, TrainingAlarm))


def _task(fn: Callable, name: str, policy: StagePolicy):
    return task(fn, name=name, task_run_name=name, retries=policy.retries,
                retry_delay_seconds=policy.retry_delay_s, timeout_seconds=policy.timeout_s,
                retry_condition_fn=_retry_unless_config_error, cache_policy=NO_CACHE)


def stage_task(stage: str):
    """The Prefect task for ``stage``, with that stage's retries, delay and timeout."""
    return _task(_run_stage, stage, POLICIES.get(stage, DEFAULT_POLICY))


def _configure(root: str, preset: str | None, teacher: str | None, method: str | None,
               overrides: list[str] | None) -> dict[str, Any]:
    from pipeline.configure import configure_params  # imports torch: only when a run needs it

    changes = configure_params(Path(root), preset, teacher, method, overrides or ())
    get_run_logger().info("params.yaml: preset %s, changes %s", preset or "(as is)", changes)
    return changes


def _check_params(root: str) -> None:
    """Validate the whole params file before any stage runs (with ``use_dvc``, DVC would delete
    a stage's outputs before the stage itself rejects its params)."""
    from pipeline.params import input_errors, load_all  # imports torch: only when a run needs it

    errors = input_errors(root, load_all(root))
    if errors:
        raise ConfigError("; ".join(errors))


def _record(root: str, prefix: str, registered: bool) -> dict[str, str]:
    """Save the workspace as a DVC experiment; tag the run's MLflow run and model version."""
    from prefect.runtime import flow_run

    base = Path(root)
    name = lineage.experiment_name(prefix)
    tags = {lineage.TAG_EXPERIMENT: name,
            lineage.TAG_EXPERIMENT_REV: lineage.save_experiment(base, name)}
    if flow_run.id:
        tags["prefect_flow_run_id"] = str(flow_run.id)
    if registered:
        from components.registry.store import tag_lineage

        reg = read_json(base / paths.REGISTER_OUT)
        tag_lineage(reg["tracking_uri"], reg["run_id"], tags, reg["model_name"], reg["version"])
    return tags


def publish_artifacts(root: Path, recorded: dict[str, str]) -> None:
    """Prefect artifacts of a run that registered a student: metrics table, MLflow run link."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    from pipeline.report import run_summary

    reg = read_json(root / paths.REGISTER_OUT)
    create_markdown_artifact(key="distillery-metrics", markdown=run_summary(
        root, reg, recorded), description=f"{reg['model_name']} version {reg['version']}")
    if reg.get("run_url"):
        create_link_artifact(key="distillery-mlflow-run", link=reg["run_url"],
                             link_text=f"MLflow run {reg['run_id']}",
                             description=f"{reg['model_name']} version {reg['version']}")


def _step(name: str, call: Callable[[], Any]) -> Any:
    """Run one step of the flow; a failure becomes ``StageFailed`` naming it (and an artifact)."""
    try:
        return call()
    except Exception as err:
        from prefect.artifacts import create_markdown_artifact

        failed = StageFailed(name, err)
        with contextlib.suppress(Exception):  # the failure itself must surface, not this
            create_markdown_artifact(key="distillery-failure", markdown=(
                f"# Failed at stage `{name}`\n\n```\n{str(failed)[-3000:]}\n```\n"))
        raise failed from err


@flow(name="distillery")
def distillery(root: str = ".", stages: list[str] | None = None, use_dvc: bool = False,
               preset: str | None = None, teacher: str | None = None,
               method: str | None = None, overrides: list[str] | None = None,
               experiment: str | None = None) -> list[str]:
    """Run ``stages`` (default: all) of the project at ``root`` in pipeline order.

    ``preset`` (a file in ``pipeline/presets`` or ``default``, the committed params.yaml),
    ``teacher`` (a folder or hub id), ``method`` and ``overrides`` (``section.key=value``) first
    rewrite ``params.yaml``. ``experiment`` (needs ``use_dvc``) saves the run as the DVC
    experiment ``<experiment>-<UTC time>`` and tags the MLflow run with it. Returns the stages
    that ran. A failing stage fails the flow with ``StageFailed`` naming it.
    """
    base = Path(root).resolve()
    env.configure(base)
    chosen = select_stages(stages)
    if experiment and not use_dvc:
        raise ValueError("experiment needs use_dvc: only `dvc repro` records the dvc.lock that "
                         "lets the experiment reproduce the student")
    ensure_gpu_limit()
    if preset or teacher or method or overrides:
        step = _task(_configure, "configure", CONFIGURE_POLICY)
        _step("configure", lambda: step(str(base), preset, teacher, method, overrides))
    if set(chosen) & set(STAGES):  # the pipeline's own stages read params.yaml
        step = _task(_check_params, "check_params", CHECK_POLICY)
        _step("check_params", lambda: step(str(base)))
    for name in chosen:
        with gpu_slot(name):
            _step(name, lambda name=name: stage_task(name)(name, str(base), use_dvc))
    recorded: dict[str, str] = {}
    if experiment:
        step = _task(_record, "record", RECORD_POLICY)
        recorded = _step("record", lambda: step(str(base), experiment, "register" in chosen))
    if "register" in chosen:
        publish_artifacts(base, recorded)
    return chosen


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.flows")
    parser.add_argument("--root", type=Path, default=Path("."), help="project root")
    parser.add_argument("--stages", nargs="+", choices=STAGES, help="default: all, in order")
    parser.add_argument("--use-dvc", action="store_true",
                        help="run each stage as `dvc repro --single-item` (records dvc.lock)")
    add_choice_arguments(parser)
    parser.add_argument("--experiment", help="save the run as DVC experiment <name>-<UTC time> "
                        "(needs --use-dvc)")
    args = parser.parse_args(argv)
    env.configure(args.root)
    distillery(root=str(args.root.resolve()), stages=args.stages, use_dvc=args.use_dvc,
               preset=args.preset, teacher=args.teacher, method=args.method,
               overrides=args.set, experiment=args.experiment)


def add_choice_arguments(parser: argparse.ArgumentParser) -> None:
    """--preset, --teacher, --method, --set: what a run distills (shared with pipeline.deploy)."""
    parser.add_argument("--preset", help="params preset: default (the committed params.yaml) "
                        "or a name in pipeline/presets/")
    parser.add_argument("--teacher", help="teacher folder or hub id (teacher.model)")
    parser.add_argument("--method", help="distillation method (distill.method)")
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                        help="override one param, like `dvc exp run -S` (repeatable)")


if __name__ == "__main__":
    main()
