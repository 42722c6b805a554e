"""The training monitor and the best checkpoint in the distill stage, on the micro world: a run
whose learning rate collapses it stops with the reason and the step, and is logged to MLflow as a
failed run; ``distill.save: best`` saves the weights of the lowest proxy FID; a warned run's
flags reach its registered version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from components.monitor import TrainingAlarm
from pipeline import paths
from pipeline.checkpoints import BEST_FILE, BEST_WEIGHTS
from pipeline.stages import distill
from tests.projects import prepared_project
from tests.threads import one_thread  # noqa: F401

pytestmark = pytest.mark.slow


def _project(tmp_path_factory, dest: Path, **distill_params) -> Path:
    """The micro world up to the distill stage's inputs, with these distill params."""
    root = prepared_project(dest / "project", tmp_path_factory)
    params = yaml.safe_load((root / "params.yaml").read_text())
    loop = distill_params.pop("loop", {})
    params["distill"].update(distill_params)
    params["distill"]["loop"].update(loop)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def _run_folder(root: Path) -> Path:
    (folder,) = [p for p in (root / paths.CHECKPOINTS).iterdir() if p.is_dir()]
    return folder


def test_a_collapsing_run_stops_with_reason_and_step_and_is_logged_to_mlflow(tmp_path_factory, tmp_path):
    from mlflow import MlflowClient

    from components.registry.store import tracking_uri

    # DMD2 at generator lr 1.0 (5e-5 is the world's): the student's images stop depending on the
    # seed within a few steps (measured on the micro world: the stop comes at step 2 or 3)
    root = _project(tmp_path_factory, tmp_path, method="dmd2",
                    methods={"dmd2": {"generator_lr": 1.0, "gen_update_ratio": 1,
                                      "warmup_steps": 0}},
                    monitor={"action": "stop", "prompts": 2, "seeds": 4},
                    loop={"steps": 8, "sample_every": 1, "log_every": 1, "checkpoint_every": 8})
    with pytest.raises(TrainingAlarm, match=r"training monitor: step \d: ") as alarm:
        distill.run(root)
    step, reason = alarm.value.step, alarm.value.reason
    assert step < 8 and reason and "distill.monitor.action: stop" in str(alarm.value)
    assert not (root / paths.STUDENT).exists()  # nothing saved as if it had worked
    stopped = json.loads((_run_folder(root) / distill.STOPPED_FILE).read_text())
    assert stopped["step"] == step and stopped["reason"] == reason

    client = MlflowClient(tracking_uri(root))
    experiment = yaml.safe_load((root / "params.yaml").read_text())["register"]["experiment"]
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["monitor.step"] == str(step)
    assert run.data.tags["monitor.reason"] == reason
    assert run.data.params["distill.methods.dmd2.generator_lr"] == "1.0"
    logged = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"samples", "rows.jsonl"} <= logged


def test_save_best_keeps_the_weights_of_the_lowest_proxy_fid(tmp_path_factory, tmp_path):
    root = _project(tmp_path_factory, tmp_path, method="sid_lsg", save="best",
                    loop={"steps": 4, "sample_every": 1, "log_every": 1, "checkpoint_every": 2})
    distill.run(root)
    folder = _run_folder(root)
    rows = [json.loads(line) for line in (folder / "rows.jsonl").read_text().splitlines()]
    fids = {r["step"]: r["proxy_fid"] for r in rows if "proxy_fid" in r}
    assert sorted(fids) == [1, 2, 3, 4]
    best = min(sorted(fids, reverse=True), key=fids.get)  # the later one on a tie
    assert json.loads((folder / BEST_FILE).read_text()) == {"step": best,
                                                            "proxy_fid": fids[best]}
    meta = json.loads((root / paths.STUDENT / "student.json").read_text())
    assert meta["saved"] == {"which": "best", "step": best, "proxy_fid": fids[best]}
    metrics = json.loads((root / paths.DISTILL_METRICS).read_text())
    assert metrics["saved_step"] == best and metrics["saved_proxy_fid"] == fids[best]
    # the saved student holds the kept weights (the EMA as sampled at that step)
    kept = {k.removeprefix("unet."): v for k, v in load_file(str(folder / BEST_WEIGHTS)).items()}
    saved = load_file(str(root / paths.STUDENT / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(saved) == set(kept)
    assert all(torch.equal(saved[k], kept[k]) for k in kept)


def test_a_warned_runs_flags_reach_its_registered_version(tmp_path_factory, tmp_path):
    from mlflow import MlflowClient

    from components.registry.store import tracking_uri
    from pipeline.stages import evaluate, register

    # a saturation floor no image meets: every sample step is flagged, the run goes on
    root = _project(tmp_path_factory, tmp_path, method="sid_lsg",
                    monitor={"action": "warn", "prompts": 2, "seeds": 2, "min_saturation": 1.0},
                    loop={"steps": 2, "sample_every": 1, "log_every": 1, "checkpoint_every": 2})
    distill.run(root)
    flags = json.loads((root / paths.DISTILL_OUT / paths.MONITOR_FILE).read_text())["flags"]
    assert [f["step"] for f in flags] == [1, 2]
    assert all("grey images" in f["reason"] for f in flags)
    assert json.loads((root / paths.DISTILL_METRICS).read_text())["monitor_flags"] == 2
    evaluate.run(root)
    register.run(root)
    reg = json.loads((root / paths.REGISTER_OUT).read_text())
    client = MlflowClient(tracking_uri(root))
    version = client.get_model_version(reg["model_name"], reg["version"])
    assert version.tags["training_monitor"].startswith("2 flag(s); first at step 1: collapsed")
    assert version.tags["saved_weights"] == "step 2 (last)"
    assert client.get_run(reg["run_id"]).data.metrics["distill.monitor_flags"] == 2
    assert "training monitor" in version.description
