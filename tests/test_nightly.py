"""The nightly loop on real servers: ``prefect server start``, a process worker (``prefect worker
start``) and an ``mlflow server``, all on 127.0.0.1, on a copy of the project with the micro preset.

Night 1 runs the whole pipeline through the deployment; night 2 changes one param while the
tracking server is down, so ``register`` fails once and is retried when the server is back. Then
the morning review: compare the nights, list the registry, load the champion, and reproduce the
first night's student from the tags of its registered version.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from components.io import sha256_file, sha256_tree
from pipeline import deploy, flows
from pipeline.lineage import dvc
from pipeline.stages import STAGES
from tests.projects import GIT_IDENTITY, copy_project, git
from tests.servers import free_port, start_mlflow_server, stop

POOL = "distillery-test"
DEPLOYMENT = "nightly-e2e"
MODEL = "distillery-world-student"  # register.model_name of the micro preset


class Tracking:
    """An ``mlflow server`` that can go down and come back on the same port and store."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc, uri = start_mlflow_server(self.folder, port=self.port)
        assert uri == self.uri

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


def client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def wait_final(flow_run_id, log: Path, timeout_s: float = 1500):
    """The flow run once it reached a final state."""
    deadline = time.monotonic() + timeout_s
    with client() as c:
        while time.monotonic() < deadline:
            run = c.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            time.sleep(3)
    raise TimeoutError(f"flow run {flow_run_id} not finished; worker log:\n"
                       f"{log.read_text(errors='replace')[-6000:]}")


def task_runs_of(flow_run_id) -> dict[str, object]:
    """Task runs of one flow run by name (the last one of each name)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with client() as c:
        runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
            any_=[flow_run_id])))
    return {run.name: run for run in sorted(runs, key=lambda r: r.expected_start_time)}


def trigger(parameters: dict):
    from prefect.deployments import run_deployment

    return run_deployment(f"distillery/{DEPLOYMENT}", parameters=parameters, timeout=0).id


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return copy_project(tmp_path_factory.mktemp("nightly-project"))


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    server = Tracking(tmp_path_factory.mktemp("nightly-mlflow"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def worker(prefect_api, project, tracking, tmp_path_factory):
    """The e2e deployment in a work pool, and a process worker polling it."""
    # scheduled 12 hours from now, so no scheduled run starts while the tests trigger theirs
    hour = (datetime.now(UTC) + timedelta(hours=12)).hour
    deploy.register(project, pool=POOL, name=DEPLOYMENT, cron=f"0 {hour} * * *",
                    preset="micro")
    home = tmp_path_factory.mktemp("worker-home")
    log = home / "worker.log"
    env = {**prefect_api.env, **GIT_IDENTITY, "PREFECT_HOME": str(home),
           "PREFECT_WORKER_QUERY_SECONDS": "2", "MLFLOW_TRACKING_URI": tracking.uri,
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "OMP_NUM_THREADS": "1",
           "PREFECT_LOGGING_LEVEL": "INFO"}
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool",
                                 POOL], cwd=home, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield log
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def night1(worker):
    run = wait_final(trigger({"preset": "micro"}), worker)
    assert run.state.is_completed(), (run.state.message, worker.read_text()[-6000:])
    return run


# ---------------------------------------------------------------- the deployment and its schedule


def test_deployment_schedule_creates_upcoming_runs(prefect_api, project):
    """Registered with a cron in a time zone, the server schedules the next nights itself."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    pool = "distillery-schedule-test"  # no worker polls it: nothing runs
    deployment_id = deploy.register(project, pool=pool, timezone="Europe/Berlin",
                                    preset="micro", method="swiftbrush")
    with client() as c:
        stored = c.read_deployment(deployment_id)
        assert c.read_work_pool(pool).type == "process"
        assert c.read_global_concurrency_limit_by_name(flows.GPU_LIMIT).limit == 1
    [schedule] = stored.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * *", "Europe/Berlin")
    assert stored.name == "nightly" and stored.global_concurrency_limit.limit == 1
    assert stored.parameters == {"root": str(project.resolve()), "stages": None, "use_dvc": True,
                                 "preset": "micro", "teacher": None, "method": "swiftbrush",
                                 "overrides": None, "experiment": "nightly"}
    assert stored.pull_steps[0]["prefect.deployments.steps.set_working_directory"] == {
        "directory": str(project.resolve())}
    upcoming = []
    deadline = time.monotonic() + 60
    while len(upcoming) < 3 and time.monotonic() < deadline:
        time.sleep(2)
        with client() as c:
            upcoming = c.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))
    assert len(upcoming) >= 3, "the server's scheduler created no upcoming runs"
    starts = sorted(run.expected_start_time for run in upcoming)
    berlin = [t.astimezone(ZoneInfo("Europe/Berlin")) for t in starts]
    assert all((t.hour, t.minute) == (2, 0) for t in berlin), berlin
    assert starts[0] > datetime.now(UTC)
    assert [(b - a).days for a, b in itertools.pairwise(berlin)] == [1] * (len(berlin) - 1)


# ---------------------------------------------------------------- night 1


@pytest.mark.slow
def test_night_runs_every_stage_and_leaves_lineage(night1, project, tracking):
    from mlflow import MlflowClient

    tasks = task_runs_of(night1.id)
    assert set(tasks) == {"configure", "check_params", *STAGES, "record"}
    assert all(t.state.is_completed() for t in tasks.values())
    # the same dvc.lock a `dvc repro` leaves, and the run saved as a DVC experiment
    assert json.loads(dvc(project, "status", "--json")) == {}
    registered = json.loads((project / "outputs/register.json").read_text())
    assert registered["version"] == "1" and registered["promoted"]
    mlflow = MlflowClient(tracking.uri, registry_uri=tracking.uri)
    version = mlflow.get_model_version(MODEL, "1")
    tags = version.tags
    assert tags["dvc_experiment"].startswith("nightly-")
    assert tags["dvc_exp_rev"] == git("rev-parse", f"refs/exps/{_exp_ref(project, tags)}",
                                      cwd=project).strip()
    assert tags["git_commit"] == git("rev-parse", "HEAD", cwd=project).strip()
    assert tags["prefect_flow_run_id"] == str(night1.id)
    assert (tags["method"], tags["teacher"]) == ("swiftbrush", "models/teacher")
    assert tags["params_hash"] == sha256_file(project / "params.yaml")[:16]
    assert tags["eval_protocol"].startswith("world-")
    run_tags = mlflow.get_run(registered["run_id"]).data.tags
    assert {k: run_tags[k] for k in ("dvc_experiment", "dvc_exp_rev", "git_commit")} == {
        k: tags[k] for k in ("dvc_experiment", "dvc_exp_rev", "git_commit")}
    aliases = mlflow.get_registered_model(MODEL).aliases
    assert {k: str(v) for k, v in aliases.items()} == {"candidate": "1", "champion": "1"}
    card = mlflow.download_artifacts(registered["run_id"], "model_card/model_card.md")
    text = Path(card).read_text()
    assert "| distilled student | 1 |" in text and "](grid.png)" in text
    assert version.description == text


def _exp_ref(project: Path, tags: dict) -> str:
    """``<baseline hash>/<name>``: where DVC keeps the experiment's git ref."""
    refs = git("for-each-ref", "--format=%(refname)", "refs/exps", cwd=project).split()
    [ref] = [r for r in refs if r.endswith("/" + tags["dvc_experiment"])]
    return ref.removeprefix("refs/exps/")


@pytest.mark.slow
def test_night_publishes_prefect_artifacts(night1, tracking):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with client() as c:
        found = c.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[night1.id])))
    by_key = {a.key: a for a in found}
    assert set(by_key) == {"distillery-metrics", "distillery-mlflow-run"}
    registered_run = by_key["distillery-mlflow-run"].data
    assert registered_run.startswith("[MLflow run ")
    assert f"]({tracking.uri}/#/experiments/" in registered_run
    metrics = by_key["distillery-metrics"].data
    assert metrics.startswith(f"# {MODEL} version 1")
    assert "| distilled student | 1 |" in metrics and "- DVC experiment `nightly-" in metrics


@pytest.mark.slow
def test_champion_generates_images(night1, project, tracking):
    import mlflow

    from components.generation import load_student

    prompts = ["a large red circle on the left, on a gray background", "a small blue square"]
    mlflow.set_tracking_uri(tracking.uri)
    try:
        model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    finally:
        mlflow.set_tracking_uri(None)
    images = model.predict(prompts)
    assert images.dtype == np.uint8 and images.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(images, load_student(project / "models/student").generate(
        prompts, [0, 1]))


# ---------------------------------------------------------------- night 2: tracking server outage


@pytest.fixture(scope="module")
def night2(night1, worker, tracking):
    """Night 2 with 3 distillation steps; the tracking server is down until register fails."""
    tracking.stop()
    flow_run_id = trigger({"preset": "micro", "overrides": ["distill.loop.steps=3"]})
    deadline = time.monotonic() + 1200
    while time.monotonic() < deadline:
        register = task_runs_of(flow_run_id).get("register")
        # a task run is listed before its first state is set: state None until then
        if register is not None and register.state is not None and (
                register.state.name == "AwaitingRetry" or register.run_count > 1):
            break
        time.sleep(1)
    else:
        raise TimeoutError(f"register never failed; worker log:\n{worker.read_text()[-6000:]}")
    tracking.start()
    run = wait_final(flow_run_id, worker)
    assert run.state.is_completed(), (run.state.message, worker.read_text()[-6000:])
    return run


@pytest.mark.slow
def test_failed_register_is_retried_and_the_night_completes(night2, project):
    register = task_runs_of(night2.id)["register"]
    assert register.state.is_completed() and register.run_count >= 2
    registered = json.loads((project / "outputs/register.json").read_text())
    assert registered["version"] == "2"
    assert json.loads((project / "metrics/distill.json").read_text())["steps"] == 3


@pytest.mark.slow
def test_morning_review(night2, project, tracking, capsys, tmp_path):
    """Compare the two nights (DVC experiments and MLflow runs), then the registry."""
    from pipeline import compare, registry_cli

    compare.main(["--root", str(project), "--out", str(tmp_path)])
    from_dvc = capsys.readouterr().out
    compare.main(["--root", str(project), "--source", "mlflow", "--tracking-uri", tracking.uri])
    from_mlflow = capsys.readouterr().out
    for table in (from_dvc, from_mlflow):
        rows = [line for line in table.splitlines() if line.startswith("| nightly-")]
        assert [row.split(" | ")[3] for row in rows] == ["3", "4"], table  # sorted by steps
        assert "- params that differ: distill.loop.steps" in table
    assert (tmp_path / "fid_over_steps.png").stat().st_size > 5000
    registry_cli.main(["--root", str(project), "--tracking-uri", tracking.uri, "list"])
    assert f"| {MODEL} | models/teacher | 1, 2 |" in capsys.readouterr().out
    registry_cli.main(["--root", str(project), "--tracking-uri", tracking.uri, "compare"])
    side = capsys.readouterr().out.splitlines()
    assert any(line.startswith("| version | 2 | ") for line in side)
    assert any(line.startswith("| distillation steps | 3 | ") for line in side)


# ---------------------------------------------------------------- reproducing night 1


@pytest.mark.slow
def test_registered_version_reproduces_from_its_tags(night2, project, tracking, tmp_path,
                                                     monkeypatch, capsys):
    """The README's recipe: the version's ``dvc_exp_rev`` tag → ``dvc exp apply`` → ``dvc repro``
    re-derives a student identical to the registered one."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    from pipeline import registry_cli

    tags = MlflowClient(tracking.uri, registry_uri=tracking.uri).get_model_version(
        MODEL, "1").tags
    registry_cli.main(["--root", str(project), "--tracking-uri", tracking.uri, "show",
                       "--version", "1", "--tag", "dvc_exp_rev"])
    rev = capsys.readouterr().out.strip()
    assert rev == tags["dvc_exp_rev"]
    dvc(project, "exp", "apply", rev)
    assert sha256_file(project / "params.yaml")[:16] == tags["params_hash"]
    shutil.rmtree(project / "checkpoints")  # no resuming: train again from scratch
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as the worker trained it: same float sums
    dvc(project, "repro", "--force", "--single-item", "distill", timeout_s=900)
    assert json.loads(dvc(project, "status", "--json")) == {}  # the lock's student hash holds
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.uri)  # models:/ resolves through it
    registered = Path(download_artifacts(f"models:/{MODEL}/1", dst_path=str(tmp_path)))
    assert sha256_tree(project / "models/student") == sha256_tree(
        registered / "artifacts" / "student")

