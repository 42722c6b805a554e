"""The ``nightly`` deployment of the ``distillery`` flow: a cron schedule in a time zone, with the
preset, teacher and method as parameters.

Schedules need a Prefect server (ephemeral mode never runs them)::

    prefect server start --host 127.0.0.1                       # shell 1
    export PREFECT_API_URL=http://127.0.0.1:4200/api            # shells 2 and 3
    python -m pipeline.deploy --root . --timezone Europe/Berlin # registers it (pool `distillery`)
    prefect worker start --pool distillery                      # runs it

or ``python -m pipeline.deploy --root . --serve`` to register and run it from one process.

Every nightly run rewrites ``params.yaml`` from its preset, runs each stage as ``dvc repro
--single-item`` (the same ``dvc.lock`` and cache entries a ``dvc repro`` leaves) and saves the
result as the DVC experiment ``nightly-<UTC time>``, whose rev the MLflow run carries. Point the
deployment at a clone used only for these runs: each run rewrites its ``params.yaml``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from components.config import ConfigError
from pipeline.flows import STAGES, add_choice_arguments, distillery, ensure_gpu_limit

NIGHTLY_CRON = "0 2 * * *"
POOL = "distillery"
ENTRYPOINT = "pipeline/flows.py:distillery"


def nightly_parameters(root: str | Path, preset: str | None = "default",
                       teacher: str | None = None, method: str | None = None,
                       overrides: Sequence[str] = (), stages: Sequence[str] | None = None,
                       use_dvc: bool = True, experiment: str | None = "nightly") -> dict[str, Any]:
    """Default parameters of the nightly deployment's runs (each run may override them)."""
    return {"root": str(Path(root).resolve()), "stages": list(stages) if stages else None,
            "use_dvc": use_dvc, "preset": preset, "teacher": teacher, "method": method,
            "overrides": list(overrides) or None, "experiment": experiment if use_dvc else None}


def check_choices(params: dict[str, Any]) -> None:
    """Fail at registration, not at 2 am: the runs' preset, teacher, method and overrides must
    make a valid params file (``pipeline.configure``; nothing is written)."""
    from pipeline.configure import render_params

    render_params(Path(params["root"]), params["preset"], params["teacher"], params["method"],
                  params["overrides"] or ())


def nightly(root: str | Path, cron: str = NIGHTLY_CRON, timezone: str = "UTC",
            name: str = "nightly", from_source: bool = False, **parameters: Any):
    """A ``RunnerDeployment`` of the flow on a cron schedule, with the project root fixed.

    ``from_source`` loads the flow from ``root`` (what a worker needs: it runs the flow in that
    folder); otherwise the deployment serves this process's flow. At most one run at a time.
    """
    from prefect.schedules import Cron

    flow_ = distillery
    if from_source:
        flow_ = distillery.from_source(source=str(Path(root).resolve()), entrypoint=ENTRYPOINT)
    params = nightly_parameters(root, **parameters)
    check_choices(params)
    return flow_.to_deployment(
        name=name, schedule=Cron(cron, timezone=timezone), parameters=params,
        concurrency_limit=1, tags=["distillery", name],
        description=f"distillery at '{cron}' ({timezone}), preset {params['preset']}")


def ensure_work_pool(pool: str = POOL) -> None:
    """Create the process work pool ``pool`` (what ``prefect worker start --pool`` polls)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(
                name=pool, type="process",
                base_job_template=ProcessWorker.get_default_base_job_template()))
        except ObjectAlreadyExists:
            pass


def register(root: str | Path, pool: str = POOL, gpu_slots: int | None = 1, **kwargs: Any):
    """Register the nightly deployment for a process worker of ``pool``; returns its id.

    Also creates the work pool and sets the GPU concurrency limit to ``gpu_slots``.
    """
    ensure_work_pool(pool)
    ensure_gpu_limit(gpu_slots)
    return nightly(root, from_source=True, **kwargs).apply(work_pool_name=pool)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.deploy")
    parser.add_argument("--root", type=Path, default=Path("."), help="project root")
    parser.add_argument("--cron", default=NIGHTLY_CRON, help=f"default: '{NIGHTLY_CRON}'")
    parser.add_argument("--timezone", default="UTC", help="IANA name, e.g. Europe/Berlin")
    parser.add_argument("--name", default="nightly", help="deployment name")
    add_choice_arguments(parser)
    parser.add_argument("--stages", nargs="+", choices=STAGES, help="default: all, in order")
    parser.add_argument("--no-dvc", action="store_true", help="run stages in-process "
                        "(no dvc.lock record, no DVC experiment)")
    parser.add_argument("--pool", default=POOL, help="process work pool of the worker")
    parser.add_argument("--gpu-slots", type=int, default=1,
                        help="size of the distillery-gpu concurrency limit (default 1)")
    parser.add_argument("--serve", action="store_true",
                        help="run the deployment from this process instead of a worker")
    args = parser.parse_args(argv)
    choices = {"preset": args.preset or "default", "teacher": args.teacher,
               "method": args.method, "overrides": args.set or (), "stages": args.stages,
               "use_dvc": not args.no_dvc}
    try:
        check_choices(nightly_parameters(args.root, **choices))
    except ConfigError as err:
        print(f"deploy: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    kwargs = {"cron": args.cron, "timezone": args.timezone, "name": args.name, **choices}
    if args.serve:
        from prefect import serve

        ensure_gpu_limit(args.gpu_slots)
        serve(nightly(args.root, **kwargs))
        return
    deployment_id = register(args.root, pool=args.pool, gpu_slots=args.gpu_slots, **kwargs)
    print(f"registered distillery/{args.name} ({deployment_id}); run it with a worker:\n"
          f"  prefect worker start --pool {args.pool}")


if __name__ == "__main__":
    main()
