"""Shared pytest configuration."""

# ---- servers (owner: registry/flows work; fixtures live in tests/servers.py) ----
from tests.servers import mlflow_server, prefect_api  # noqa: F401
# ---- end servers ----
