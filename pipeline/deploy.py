"""The ``nightly`` deployment of the ``distillery`` flow, served by this process.

Needs a Prefect server (ephemeral mode never runs schedules)::

    prefect server start --host 127.0.0.1          # in one shell
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m pipeline.deploy --root .

The nightly run uses DVC (``use_dvc``), so it leaves the same ``dvc.lock`` and cache entries a
``dvc repro`` leaves and any nightly student can be reproduced from its commit.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from pipeline.flows import STAGES, distillery

NIGHTLY_CRON = "0 2 * * *"


def nightly(root: str | Path, cron: str = NIGHTLY_CRON, timezone: str = "UTC",
            stages: Sequence[str] | None = None, use_dvc: bool = True, name: str = "nightly"):
    """A ``RunnerDeployment`` of the flow on a cron schedule, with the project root fixed."""
    from prefect.schedules import Cron

    parameters = {"root": str(Path(root).resolve()), "stages": list(stages) if stages else None,
                  "use_dvc": use_dvc}
    return distillery.to_deployment(
        name=name, schedule=Cron(cron, timezone=timezone), parameters=parameters,
        tags=["distillery", name], description=f"distillery at '{cron}' ({timezone})")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.deploy")
    parser.add_argument("--root", type=Path, default=Path("."), help="project root")
    parser.add_argument("--cron", default=NIGHTLY_CRON)
    parser.add_argument("--timezone", default="UTC", help="IANA name, e.g. Europe/Berlin")
    parser.add_argument("--stages", nargs="+", choices=STAGES, help="default: all, in order")
    parser.add_argument("--no-dvc", action="store_true",
                        help="run stages in-process instead of `dvc repro` (no dvc.lock record)")
    args = parser.parse_args(argv)
    from prefect import serve

    serve(nightly(args.root, args.cron, args.timezone, args.stages, use_dvc=not args.no_dvc))


if __name__ == "__main__":
    main()
