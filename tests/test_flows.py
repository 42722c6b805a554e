"""Prefect flow: real flow and task runs against a real ``prefect server start`` (fixture
``prefect_api``). The nightly deployment and whole-pipeline runs: ``test_nightly.py``.

Stages are injected into ``pipeline.flows.RUNNERS``/``POLICIES`` for a test, so retries, timeouts
and failures go through Prefect's own engine, not a mock of it.
"""

from __future__ import annotations

import contextvars
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from components.config import ConfigError
from pipeline import flows
from pipeline.flows import STAGES, StageFailed, StagePolicy, distillery, select_stages

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


def latest_artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC, limit=1)
    return found[0] if found else None


def test_failing_stage_is_named(prefect_api, monkeypatch, tmp_path):
    calls, ran_after = [], []

    def broken(root: Path) -> None:
        calls.append(1)
        raise ValueError("boom")

    inject(monkeypatch, "broken", broken)
    inject(monkeypatch, "after_broken", lambda root: ran_after.append(1))
    state = distillery(root=str(tmp_path), stages=["broken", "after_broken"], return_state=True)
    assert state.is_failed()
    assert "stage 'broken' failed: ValueError: boom" in state.message  # what the UI shows
    with pytest.raises(StageFailed, match=r"stage 'broken' failed: ValueError: boom") as info:
        state.result()
    assert info.value.stage == "broken"
    assert len(calls) == 2 and ran_after == []  # retried once, later stages never start
    [run] = task_runs("broken")
    assert run.state.is_failed()
    artifact = latest_artifact("distillery-failure")
    assert artifact.flow_run_id == state.state_details.flow_run_id
    assert artifact.data.startswith("# Failed at stage `broken`")


def test_bad_preset_fails_the_configure_step(prefect_api, tmp_path):
    (tmp_path / "params.yaml").write_text("{}")
    with pytest.raises(StageFailed, match=r"stage 'configure' failed: ConfigError: unknown "
                                          r"preset 'nano'; valid presets are: default") as info:
        distillery(root=str(tmp_path), stages=["prepare_prompts"], preset="nano")
    assert info.value.stage == "configure"
    [run] = task_runs("configure")[-1:]
    assert run.run_count == 1 and run.state.is_failed()  # a config error is not retried
    assert (tmp_path / "params.yaml").read_text() == "{}"


def test_experiment_needs_dvc(prefect_api, tmp_path):
    with pytest.raises(ValueError, match="experiment needs use_dvc"):
        distillery(root=str(tmp_path), stages=["register"], experiment="nightly")


def test_gpu_stages_never_overlap(prefect_api):
    """Two GPU stages of two runs wait for the one ``distillery-gpu`` slot; others do not."""
    from prefect.client.orchestration import get_client

    flows.ensure_gpu_limit()
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(flows.GPU_LIMIT).limit == 1
    assert flows.POLICIES["distill"].gpu and not flows.POLICIES["register"].gpu
    spans: dict[str, tuple[float, float]] = {}
    gpu_held, cpu_entered = threading.Event(), threading.Event()
    saw_cpu: list[bool] = []

    def gpu(key: str, stage: str) -> None:
        with flows.gpu_slot(stage):
            start = time.monotonic()
            gpu_held.set()
            # hold the slot until register has got through its own: were register to wait
            # for the GPU too, this would time out
            saw_cpu.append(cpu_entered.wait(timeout=60))
            time.sleep(0.5)
            spans[key] = (start, time.monotonic())

    def cpu() -> None:
        assert gpu_held.wait(timeout=120), "no GPU stage got the slot"
        with flows.gpu_slot("register"):
            cpu_entered.set()

    # each thread carries this test's Prefect settings (they live in context variables)
    def thread(target, *args) -> threading.Thread:
        return threading.Thread(target=contextvars.copy_context().run, args=(target, *args))

    threads = [thread(gpu, "gpu-1", "distill"), thread(gpu, "gpu-2", "evaluate"), thread(cpu)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    (a0, a1), (b0, b1) = spans["gpu-1"], spans["gpu-2"]
    assert a1 <= b0 or b1 <= a0, spans  # one after the other
    assert saw_cpu == [True, True]  # register got through while a GPU stage held the slot


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


def test_flow_module_cli_rejects_unknown_stage():
    with pytest.raises(SystemExit):
        flows.main(["--stages", "nope"])


def test_params_are_checked_before_any_stage_runs(prefect_api, monkeypatch, tmp_path):
    """A typo in a late stage's section fails the flow before the first stage deletes anything."""
    import yaml

    params = yaml.safe_load((Path(__file__).parents[1] / "pipeline/presets/micro.yaml").read_text())
    params["distill"]["loop"]["stepz"] = 4
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    ran = []
    inject(monkeypatch, "bootstrap", lambda root: ran.append("bootstrap"))
    with pytest.raises(StageFailed, match=r"stage 'check_params' failed: ConfigError: "
                                          r"distill.loop: unknown key\(s\) 'stepz'"):
        distillery(root=str(tmp_path), stages=["bootstrap", "distill"])
    assert ran == []


def test_a_run_the_monitor_stopped_is_not_retried(prefect_api, monkeypatch, tmp_path):
    """A retry would resume from the last checkpoint and meet the same step again."""
    from components.monitor import TrainingAlarm

    calls = []

    def collapsing(root: Path) -> None:
        calls.append(1)
        raise TrainingAlarm("training monitor: step 7: mode collapse: diversity across seeds "
                            "0.0020 is 3% of its first value", 7, "mode collapse")

    inject(monkeypatch, "collapsing", collapsing, StagePolicy(retries=3, retry_delay_s=0))
    with pytest.raises(StageFailed, match=r"stage 'collapsing' failed: TrainingAlarm: training "
                       r"monitor: step 7: mode collapse"):
        distillery(root=str(tmp_path), stages=["collapsing"])
    assert len(calls) == 1


def test_a_stopped_run_under_dvc_fails_its_task_once_with_the_reason(prefect_api, monkeypatch,
                                                                    dvc_project):
    """Through ``dvc repro`` the stage's one-line error is all the flow sees: it still knows the
    monitor stopped the run (reason and step) and does not retry it."""
    (dvc_project / "collapses.py").write_text(
        "open('calls', 'a').write('x')\n"
        "print('distill: error: training monitor: step 3: collapsed: mean saturation 0.0001 "
        "< 0.01 (grey images); the run stopped (distill.monitor.action: stop)')\n"
        "raise SystemExit(2)\n")
    (dvc_project / "dvc.yaml").write_text(DVC_YAML + "  collapses:\n    cmd: python collapses.py\n")
    inject(monkeypatch, "collapses", lambda root: None, StagePolicy(retries=2, retry_delay_s=0))
    with pytest.raises(StageFailed, match=r"stage 'collapses' failed: TrainingAlarm: training "
                       r"monitor: step 3: collapsed: mean saturation") as info:
        distillery(root=str(dvc_project), stages=["collapses"], use_dvc=True)
    assert "the run stopped" in str(info.value)
    assert (dvc_project / "calls").read_text() == "x"  # one attempt, no retries
