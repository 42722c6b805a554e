"""Offline and quiet defaults for every entry point, set for this process only.

Nothing here changes the user's machine: values are set with ``setdefault`` in ``os.environ`` of
the running process (and inherited by its children), so a user's own settings always win.
"""

from __future__ import annotations

import os
from pathlib import Path

QUIET = {
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "DISABLE_TELEMETRY": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "DVC_NO_ANALYTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "GIT_PYTHON_REFRESH": "quiet",
}


def configure(root: str | Path = ".", offline: bool | None = None) -> None:
    """Set quiet defaults; with ``offline`` (default: ``DISTILLERY_OFFLINE``, else on) no hub calls.

    ``PREFECT_HOME`` defaults to ``<root>/.prefect`` so Prefect's database stays in the project.
    """
    root = Path(root).resolve()
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    if offline is None:
        offline = os.environ.get("DISTILLERY_OFFLINE", "1") != "0"
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
