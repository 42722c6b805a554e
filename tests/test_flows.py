"""Prefect flow: real flow and task runs against Prefect's test API (fixture ``prefect_api``).

Stages are injected into ``pipeline.flows.RUNNERS``/``POLICIES`` for a test, so retries, timeouts
and failures go through Prefect's own engine, not a mock of it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from components.config import ConfigError
from pipeline import flows
from pipeline.flows import STAGES, StageFailed, StagePolicy, distillery, select_stages
from tests.projects import copy_project

FAST = StagePolicy(retries=1, retry_delay_s=0, timeout_s=60)


def inject(monkeypatch, name, fn, policy=FAST):
    monkeypatch.setitem(flows.RUNNERS, name, fn)
    monkeypatch.setitem(flows.POLICIES, name, policy)


def task_runs(name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as client:
        return client.read_task_runs(task_run_filter=TaskRunFilter(
            name=TaskRunFilterName(any_=[name])))


def test_select_stages_orders_and_validates():
    assert select_stages(None) == list(STAGES)
    assert select_stages(["register", "distill", "distill"]) == ["distill", "register"]
    with pytest.raises(ValueError, match="valid stages are: bootstrap, prepare_prompts"):
        select_stages(["distil"])


def test_every_stage_has_a_policy():
    assert set(flows.POLICIES) == set(STAGES)


def test_stage_failing_once_is_retried(prefect_api, monkeypatch, tmp_path):
    calls = []

    def flaky_once(root: Path) -> None:
        calls.append(root)
        if len(calls) == 1:
            raise OSError("disk hiccup")
        (root / "done").write_text("ok")

    inject(monkeypatch, "flaky_once", flaky_once)
    assert distillery(root=str(tmp_path), stages=["flaky_once"]) == ["flaky_once"]
    assert calls == [tmp_path.resolve()] * 2 and (tmp_path / "done").exists()
    [run] = task_runs("flaky_once")
    assert run.run_count == 2 and run.state.is_completed()


def test_failing_stage_is_named(prefect_api, monkeypatch, tmp_path):
    calls, ran_after = [], []

    def broken(root: Path) -> None:
        calls.append(1)
        raise ValueError("boom")

    inject(monkeypatch, "broken", broken)
    inject(monkeypatch, "after_broken", lambda root: ran_after.append(1))
    with pytest.raises(StageFailed, match=r"stage 'broken' failed: ValueError: boom") as info:
        distillery(root=str(tmp_path), stages=["broken", "after_broken"])
    assert info.value.stage == "broken"
    assert len(calls) == 2 and ran_after == []  # retried once, later stages never start
    [run] = task_runs("broken")
    assert run.state.is_failed()


def test_config_error_is_not_retried(prefect_api, monkeypatch, tmp_path):
    calls = []

    def misconfigured(root: Path) -> None:
        calls.append(1)
        raise ConfigError("distill: unknown key 'lr_'")

    inject(monkeypatch, "misconfigured", misconfigured, StagePolicy(retries=3, retry_delay_s=0))
    with pytest.raises(StageFailed, match="stage 'misconfigured' failed: ConfigError"):
        distillery(root=str(tmp_path), stages=["misconfigured"])
    assert len(calls) == 1


def test_stage_timeout(prefect_api, monkeypatch, tmp_path):
    def stuck(root: Path) -> None:
        for _ in range(200):  # short sleeps: a timeout can interrupt between them
            time.sleep(0.05)

    inject(monkeypatch, "stuck", stuck, StagePolicy(retries=0, retry_delay_s=0, timeout_s=1))
    start = time.monotonic()
    with pytest.raises(StageFailed, match=r"stage 'stuck' failed: \w*TimeoutError") as info:
        distillery(root=str(tmp_path), stages=["stuck"])
    assert isinstance(info.value.__cause__, TimeoutError)
    assert time.monotonic() - start < 8


DVC_YAML = """\
stages:
  hello:
    cmd: python -c "import sys; open('out.txt', 'w').write(sys.executable)"
    outs:
      - out.txt
  fails:
    cmd: python -c "raise SystemExit('no luck')"
"""


@pytest.fixture
def dvc_project(tmp_path) -> Path:
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"],
                   cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    return tmp_path


def test_use_dvc_leaves_dvc_lineage(prefect_api, monkeypatch, dvc_project):
    def not_in_process(root: Path) -> None:
        raise AssertionError("with use_dvc the stage must run through DVC")

    inject(monkeypatch, "hello", not_in_process)
    inject(monkeypatch, "fails", not_in_process, StagePolicy(retries=0, retry_delay_s=0))
    distillery(root=str(dvc_project), stages=["hello"], use_dvc=True)
    assert "hello:" in (dvc_project / "dvc.lock").read_text()
    # the stage ran with this interpreter (same environment), and its output is in the cache
    assert Path((dvc_project / "out.txt").read_text()).parent == Path(sys.executable).parent
    assert any(p.is_file() for p in (dvc_project / ".dvc" / "cache").rglob("*"))
    with pytest.raises(StageFailed, match=r"(?s)stage 'fails' failed: .*no luck"):
        distillery(root=str(dvc_project), stages=["fails"], use_dvc=True)


def test_nightly_deployment(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client

    from pipeline.deploy import nightly

    deployment = nightly(tmp_path, timezone="Europe/Berlin", stages=["distill"])
    assert deployment.name == "nightly"
    assert deployment.parameters == {"root": str(tmp_path.resolve()), "stages": ["distill"],
                                     "use_dvc": True}
    deployment_id = deployment.apply()
    with get_client(sync_client=True) as client:
        stored = client.read_deployment(deployment_id)
    [schedule] = stored.schedules
    assert schedule.schedule.cron == "0 2 * * *"
    assert schedule.schedule.timezone == "Europe/Berlin"
    assert stored.parameters["use_dvc"] is True


def test_flow_module_cli_rejects_unknown_stage():
    with pytest.raises(SystemExit):
        flows.main(["--stages", "nope"])


# ---------------------------------------------------------------- the whole pipeline (micro)


@pytest.fixture(scope="module")
def micro_project(tmp_path_factory) -> Path:
    """The project's files as git sees them, in a fresh git repo, with the micro preset."""
    return copy_project(tmp_path_factory.mktemp("flow-project"))


@pytest.mark.slow
def test_flow_with_dvc_leaves_dvc_lineage(prefect_api, monkeypatch, micro_project):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's own sqlite store
    assert distillery(root=str(micro_project), use_dvc=True) == list(STAGES)
    lock = (micro_project / "dvc.lock").read_text()
    assert all(f"\n  {stage}:" in lock for stage in STAGES)
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=micro_project,
                            check=True, capture_output=True, text=True).stdout
    assert json.loads(status) == {}  # exactly what `dvc repro` would have recorded
    registered = json.loads((micro_project / "outputs/register.json").read_text())
    assert registered["version"] == "1" and registered["promoted"]
    for stage in STAGES:
        [run] = task_runs(stage)[-1:]
        assert run.state.is_completed()


@pytest.mark.slow
def test_flow_in_process_reruns_stages(prefect_api, monkeypatch, micro_project):
    """The same stage functions, called in-process: evaluate again, then register version 2."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if not (micro_project / "models/student").exists():
        pytest.skip("needs the DVC flow test's outputs")
    assert distillery(root=str(micro_project), stages=["register", "evaluate"]) == [
        "evaluate", "register"]
    registered = json.loads((micro_project / "outputs/register.json").read_text())
    assert registered["version"] == "2"
    # same student, same protocol, same FID: the gate keeps the champion (margin 0, not better)
    assert not registered["promoted"] and registered["champion"] == "1", registered
