"""A LoRA student of the world, end to end on the micro preset: the distill stage trains DMD2
with ``distill.student: lora`` (the monitor watching), saves the LoRA beside the fused folder,
the LoRA on the world's teacher is the student bit for bit, and the registered student loads
through ``mlflow.diffusers``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from components.generation import load_student
from pipeline import paths
from pipeline.stages import distill
from tests.projects import prepared_project
from tests.threads import one_thread  # noqa: F401

pytestmark = pytest.mark.slow
PROMPTS, SEEDS = ["a red circle", "a blue square"], [1, 2]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = prepared_project(tmp_path_factory.mktemp("lora") / "project", tmp_path_factory)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["distill"].update(
        method="dmd2", student={"kind": "lora", "rank": 4, "alpha": 4.0},
        monitor={"action": "warn", "prompts": 2, "seeds": 2})
    params["distill"]["loop"].update(steps=2, sample_every=1, checkpoint_every=2, log_every=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    distill.run(root)
    return root


def test_the_world_lora_student_is_the_teacher_plus_its_lora(project):
    student = project / paths.STUDENT
    meta = json.loads((student / "student.json").read_text())
    assert meta["student"]["kind"] == "lora" and (student / meta["student"]["weights"]).exists()
    exact = load_student(student, base=project / "models/teacher").generate(PROMPTS, SEEDS)
    fused = load_student(student).generate(PROMPTS, SEEDS)
    assert np.abs(exact.astype(int) - fused.astype(int)).max() <= 1
    rows = list((project / paths.PROXY_FID_PLOT).read_text().splitlines())
    assert "monitor_diversity" in rows[0] and len(rows) == 3  # header + both sample steps


def test_the_world_lora_student_registers_and_loads_through_mlflow_diffusers(project):
    import mlflow.diffusers

    from components.generation import Student
    from components.registry.gate import Lineage, RegisterConfig
    from components.registry.store import artifact_location, register_student
    from pipeline.stages.register import base_model

    student = project / paths.STUDENT
    meta = json.loads((student / "student.json").read_text())
    uri = f"sqlite:///{project / 'mlflow.db'}"
    result = register_student(
        RegisterConfig(model_name="world-lora", experiment="e", fid_margin=1.0,
                       clip_tolerance=0.25), student, {"fid": 100.0, "clip_score": 0.5},
        Lineage("abc", "dmd2", meta["teacher"], "ph", "p"), uri=uri,
        artifact_root=artifact_location(project, uri), base_model=base_model(project, meta))
    mlflow.set_tracking_uri(uri)
    try:
        pipe = mlflow.diffusers.load_model(result["lora_model_uri"]).load_pipeline(
            device="cpu", torch_dtype=torch.float32)
    finally:
        mlflow.set_tracking_uri(None)
    pipe.set_progress_bar_config(disable=True)
    ours = load_student(student, base=project / "models/teacher")
    images = Student(pipe, ours.spec).generate(PROMPTS, SEEDS)
    assert np.array_equal(images, ours.generate(PROMPTS, SEEDS))
