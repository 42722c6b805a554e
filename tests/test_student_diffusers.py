"""A student folder is a plain diffusers pipeline: ``StableDiffusionPipeline.from_pretrained``
with the call ``student.json`` names reproduces ``Student.generate``, in a process that imports
nothing of the project, for every generator kind a stock scheduler can express; the one that
cannot says so. And the saved folder holds no machine path: the same weights hash the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from components.generation import GeneratorSpec, load_student, save_student
from components.io import sha256_tree
from components.teacher import teacher_denoiser
from tests.tiny import build_tiny_teacher, tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "a blue square at the top"]
SEEDS = [3, 11]
# What a plain diffusers user runs: nothing of Distillery is importable (cwd and sys.path are
# the temp folder's), the call's arguments come from student.json.
PLAIN_USER = """
import json, sys
from pathlib import Path
import numpy as np, torch
from diffusers import StableDiffusionPipeline
assert not any(m.split(".")[0] in ("components", "pipeline", "tests") for m in sys.modules)
prompts, seeds = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for arg in sys.argv[3:]:  # a folder, or folder=n: that student with n steps
    folder, _, steps = arg.partition("=")
    call = json.loads((Path(folder) / "student.json").read_text())["diffusers"]["call"]
    call.update({"num_inference_steps": int(steps)} if steps else {})
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    images = [pipe(p, generator=torch.Generator().manual_seed(s), output_type="np",
                   **call).images[0] for p, s in zip(prompts, seeds)]
    out = (np.stack(images) * 255).round().astype(np.uint8)
    np.save(Path(folder) / f"plain{steps}.npy", out)
"""

FEWER = (2, 1)  # the step counts the four-step student is also sampled with
KINDS = {
    "one_step_unit": GeneratorSpec(),  # SwiftBrush, DMD2
    "one_step_sigma": GeneratorSpec(t=625, input_scale="sigma"),  # SiD-LSG
    "one_step_unit_t500": GeneratorSpec(t=500, input_scale="unit"),  # DMD2 at another t
    "few_step_ddim": GeneratorSpec(kind="ddim", steps=4),
    "four_step_unit": GeneratorSpec(steps=4),  # DMD2's four-step generator (LCMScheduler)
    "two_step_unit": GeneratorSpec(steps=2),
    "w_conditioned_ddim": GeneratorSpec(kind="ddim", steps=2, guidance_weight=3.0, w_dim=8),
}


def _student_pipe(spec: GeneratorSpec):
    pipe = tiny_pipeline(0)
    if spec.w_dim:  # a Meng student: the UNet reads w through diffusers' time_cond_proj_dim
        unet = teacher_denoiser(pipe).with_w_embedding(spec.w_dim).unet
        torch.nn.init.normal_(unet.time_embedding.cond_proj.weight, std=0.5)  # w must matter
        pipe.unet = unet
    return pipe


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    base = tmp_path_factory.mktemp("students")
    for name, spec in KINDS.items():
        save_student(_student_pipe(spec), spec, base / name, {"method": name})
    return base


def test_plain_diffusers_pipeline_reproduces_every_expressible_kind(students, tmp_path):
    # and a four-step student sampled with two steps and one (student.json: sampling_steps)
    folders = [str(students / name) for name in KINDS] + [
        f"{students / 'four_step_unit'}={n}" for n in FEWER]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", PLAIN_USER, json.dumps(PROMPTS),
                           json.dumps(SEEDS), *folders], cwd=tmp_path, env=env,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in KINDS:
        ours = load_student(students / name).generate(PROMPTS, SEEDS)
        plain = np.load(students / name / "plain.npy")
        diff = np.abs(ours.astype(int) - plain.astype(int)).max()
        assert diff <= 1, f"{name}: plain diffusers differs from Student.generate by {diff}/255"
        assert ours.std() > 0
    four = load_student(students / "four_step_unit")
    for n in FEWER:
        ours = four.generate(PROMPTS, SEEDS, steps=n)
        diff = np.abs(ours.astype(int) - np.load(students / f"four_step_unit/plain{n}.npy")).max()
        assert diff <= 1, f"four-step student at {n} steps differs by {diff}/255"
    assert len({four.generate(PROMPTS, SEEDS, steps=n).tobytes() for n in (1, 2, 4)}) == 3


def test_student_json_names_the_stock_call(students):
    meta = json.loads((students / "w_conditioned_ddim" / "student.json").read_text())
    assert meta["diffusers"] == {
        "reproduces_student": True, "pipeline": "StableDiffusionPipeline",
        "scheduler": "DDIMScheduler", "call": {"num_inference_steps": 2, "guidance_scale": 4.0}}
    sched = json.loads((students / "one_step_sigma/scheduler/scheduler_config.json").read_text())
    assert sched["_class_name"] == "EulerDiscreteScheduler"
    four = json.loads((students / "four_step_unit" / "student.json").read_text())
    assert four["diffusers"]["scheduler"] == "LCMScheduler" and four["sampling_steps"] == [1, 2, 4]
    assert four["diffusers"]["call"] == {"num_inference_steps": 4, "guidance_scale": 1.0}


def test_rectified_flow_says_no_stock_scheduler_reproduces_it(tmp_path):
    save_student(tiny_pipeline(0), GeneratorSpec(kind="rectified_flow", steps=2), tmp_path / "s",
                 {"method": "instaflow"})
    entry = json.loads((tmp_path / "s/student.json").read_text())["diffusers"]
    assert entry["reproduces_student"] is False and "rectified-flow" in entry["reason"]
    assert "no stock diffusers scheduler" in (ROOT / "README.md").read_text()


def test_same_weights_hash_the_same_in_two_clones(tmp_path):
    """The teacher loaded from two different folders (two clones) gives byte-identical students."""
    from diffusers import StableDiffusionPipeline

    digests = set()
    for clone in ("clone-a", "elsewhere/clone-b"):
        teacher = build_tiny_teacher(tmp_path / clone / "models/teacher")
        pipe = StableDiffusionPipeline.from_pretrained(teacher)
        save_student(pipe, GeneratorSpec(), tmp_path / clone / "models/student", {"method": "x"})
        folder = tmp_path / clone / "models/student"
        assert str(tmp_path) not in "".join(p.read_text() for p in folder.rglob("*.json"))
        digests.add(sha256_tree(folder))
    assert len(digests) == 1
