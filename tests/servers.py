"""Real servers for tests, on 127.0.0.1 only: ``mlflow server`` and ``prefect server start``.

Both are session fixtures, started on first use and stopped in ``finally`` blocks. Import them
into ``tests/conftest.py`` with one line. ``prefect_api`` points this process's Prefect client at
the Prefect server; subprocesses get ``PrefectServer.env``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.env import configure


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Poll ``url`` until it answers 200; fail early, with the server's log, if it exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not healthy after {timeout_s:.0f} s:\n{_tail(log)}")


def stop(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM the server process itself (it stops its workers); SIGKILL its group if it hangs."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what it started
        proc.wait(timeout=10)


def _tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    folder: Path
    pid: int


def start_mlflow_server(folder: Path, timeout_s: float = 120,
                        port: int | None = None) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` on ``port`` (default: a free one) with a sqlite store and artifacts under
    ``folder``. Starting it again on the same folder and port brings back the same store."""
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
           "--artifacts-destination", str(folder / "mlartifacts")]
    log = folder / "server.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{uri}/health", proc, log, timeout_s)
    except BaseException:
        stop(proc)
        raise
    return proc, uri


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real MLflow tracking server (1 worker, no job runner) for the whole test session."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    configure(folder)
    proc, uri = start_mlflow_server(folder)
    try:
        yield MlflowServer(uri=uri, folder=folder, pid=proc.pid)
    finally:
        stop(proc)


@dataclass(frozen=True)
class PrefectServer:
    url: str  # the API URL, ``http://127.0.0.1:<port>/api``
    folder: Path
    pid: int

    @property
    def env(self) -> dict[str, str]:
        """Environment for a subprocess (worker, flow run) that talks to this server."""
        return {**os.environ, "PREFECT_API_URL": self.url, "PREFECT_HOME": str(self.folder)}


def start_prefect_server(folder: Path, timeout_s: float = 180) -> tuple[subprocess.Popen, str]:
    """``prefect server start`` on 127.0.0.1 with its database in ``folder`` (no UI)."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(folder), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false", "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
           "PREFECT_SERVER_DATABASE_CONNECTION_URL":
               f"sqlite+aiosqlite:///{folder / 'prefect.db'}"}
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
           "--port", str(port), "--no-ui"]
    log = folder / "server.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_healthy(f"{url}/health", proc, log, timeout_s)
    except BaseException:
        stop(proc)
        raise
    return proc, url


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A real ``prefect server start`` (API and scheduler, no UI) for the whole test session."""
    folder = tmp_path_factory.mktemp("prefect-server")
    configure(folder)
    proc, url = start_prefect_server(folder)
    try:
        yield PrefectServer(url=url, folder=folder, pid=proc.pid)
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def prefect_api(prefect_server: PrefectServer) -> Iterator[PrefectServer]:
    """This process's Prefect client (flows, tasks, ``get_client``) pointed at ``prefect_server``."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.url}):
        try:
            yield prefect_server
        finally:
            from prefect.logging.handlers import APILogHandler

            APILogHandler().flush()  # send buffered run logs while the server is still up
