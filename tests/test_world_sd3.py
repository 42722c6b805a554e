"""The world's flow teacher (``world.teacher: sd3``): bootstrap trains an SD3-style transformer
with flow matching and saves a genuine ``StableDiffusion3Pipeline`` folder, which plain diffusers
generates from; the whole DAG runs on it on the micro preset, and its student registers under
the teacher family's own model name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from components.generation import load_student
from pipeline import paths
from pipeline.params import load_all
from pipeline.stages import (
    bootstrap,
    cache_teacher,
    distill,
    evaluate,
    prepare_prompts,
    reference_stats,
)
from pipeline.stages import register as register_stage
from tests.projects import copy_project
from tests.test_flow_students import stock_images
from tests.threads import one_thread  # noqa: F401

# What a plain diffusers user runs on the teacher folder: nothing of the project is imported.
PLAIN_TEACHER = """
import sys
import diffusers, numpy as np, torch
assert not any(m.split(".")[0] in ("components", "pipeline", "tests") for m in sys.modules)
pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(sys.argv[1])
pipe.set_progress_bar_config(disable=True)
out = pipe("a large red circle in the top left, on a black background", num_inference_steps=4,
           max_sequence_length=pipe.tokenizer_3.model_max_length, output_type="np",
           generator=torch.Generator().manual_seed(0)).images
np.save(sys.argv[2], out)
"""


def _set(root: Path, **changes) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    for key, value in changes.items():
        section, _, name = key.partition(".")
        params[section][name] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = copy_project(tmp_path_factory.mktemp("world-sd3") / "p")
    _set(root, **{"world.teacher": "sd3"})
    for stage in (bootstrap, prepare_prompts, cache_teacher, reference_stats):
        stage.run(root)
    return root


def test_bootstrap_saves_a_stable_diffusion_3_pipeline_plain_diffusers_generates_from(project):
    index = json.loads((project / paths.TEACHER / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    report = json.loads((project / paths.BOOTSTRAP_METRICS).read_text())
    assert report["teacher"] == "sd3" and report["sd3"]["steps"] == 10
    assert set(report["accuracy"]["cfg"]) >= {"colour", "shape", "position", "all"}
    out = project / "plain.npy"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", PLAIN_TEACHER,
                           str(project / paths.TEACHER), str(out)], cwd=project.parent, env=env,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    image = np.load(out)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all() and image.std() > 0


def test_the_dag_runs_and_registers_under_the_families_model_name(project):
    import mlflow

    for stage in (distill, evaluate, register_stage):
        stage.run(project)
    result = json.loads((project / paths.REGISTER_OUT).read_text())
    name = load_all(project)["register"].model_name
    assert name == "distillery-world-student-sd3"
    student = project / paths.STUDENT
    meta = json.loads((student / "student.json").read_text())
    assert meta["diffusers"]["pipeline"] == "StableDiffusion3Pipeline"
    prompts, seeds = ["a small blue square in the bottom right, on a white background"], [0]
    ours = load_student(student).generate(prompts, seeds)
    assert np.abs(ours.astype(int) - stock_images(student, prompts, seeds).astype(int)).max() <= 1
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    try:
        client = mlflow.MlflowClient()
        assert client.get_registered_model(name).name == name
        model = mlflow.pyfunc.load_model(f"models:/{name}/{result['version']}")
    finally:
        mlflow.set_tracking_uri(None)
    assert np.array_equal(model.predict(prompts), ours)


def test_the_world_teacher_family_names_the_registered_model(tmp_path):
    root = copy_project(tmp_path / "p")
    assert load_all(root)["register"].model_name == "distillery-world-student"
    _set(root, **{"world.teacher": "sd3"})
    assert load_all(root)["register"].model_name == "distillery-world-student-sd3"
    _set(root, **{"world.teacher": "dit"})
    with pytest.raises(Exception, match="world.teacher must be one of unet, sd3"):
        load_all(root)
