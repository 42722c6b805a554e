"""Shared pytest configuration."""

import os
import tempfile

from pipeline import env

# Offline and quiet for every test; Prefect's home in a throwaway folder, never the user's.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="distillery-prefect-"))
env.configure(tempfile.gettempdir(), offline=True)

# ---- servers (owner: registry/flows work; fixtures live in tests/servers.py) ----
from tests.servers import mlflow_server, prefect_api, prefect_server  # noqa: F401

# ---- end servers ----


def _share_the_cores() -> None:
    """Under pytest-xdist, each worker gets its share of the cores (torch, BLAS, subprocesses).

    Without it every worker would start as many torch threads as the machine has cores, and the
    workers would oversubscribe the CPU (on the 2-core CI machine: 4 threads on 2 cores).
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers <= 1:
        return
    share = str(max(1, (os.cpu_count() or 1) // workers))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, share)
    import torch

    torch.set_num_threads(int(share))


_share_the_cores()
