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
