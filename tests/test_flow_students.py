"""A student of a flow teacher is a plain diffusers ``StableDiffusion3Pipeline`` (or
``FluxPipeline``) folder: the stock pipeline with the call ``student.json`` names, in a process
that imports nothing of the project, reproduces ``Student.generate`` for every generator kind it
can express (the one it cannot says why); a Meng et al. student's w input is folded into
the saved transformer; latents follow the VAE's shift factor, ``(z − shift) · scale``, as
diffusers' SD3 pipelines do (a decode that ignored it differs from the stock one by 24/255 on
the tiny VAE)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from components.generation import GeneratorSpec, Student, decode_latents, load_student, save_student
from components.networks import saved_network
from components.real_latents import encode_images
from components.teacher import teacher_denoiser
from tests.test_protocols import photos
from tests.tiny_flow import tiny_sana_pipeline, tiny_sd3_pipeline

PROMPTS, SEEDS = ["a red circle", "a blue square at the top"], [3, 11]
KINDS = {
    "one_step": GeneratorSpec(),  # SwiftBrush, DMD2
    "one_step_t500": GeneratorSpec(t=500),  # DMD2 at another t
    "rectified_flow": GeneratorSpec(kind="rectified_flow", steps=2),  # InstaFlow
    "w_conditioned_ddim": GeneratorSpec(kind="ddim", steps=2, guidance_weight=3.0, w_dim=8),
}


def _w_student(pipe):
    """A Meng et al. student network whose w input matters (its projection is not zero)."""
    torch.manual_seed(1)
    net = teacher_denoiser(pipe).with_w_embedding(8)
    torch.nn.init.normal_(net.w_proj.weight, std=0.5)
    return net


# What a plain diffusers user runs: nothing of Distillery is importable (cwd and sys.path are
# the temp folder's); the pipeline class, from_pretrained and call arguments come from
# student.json.
PLAIN_USER = """
import json, sys
from pathlib import Path
import diffusers, numpy as np, torch
assert not any(m.split(".")[0] in ("components", "pipeline", "tests") for m in sys.modules)
prompts, seeds = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for folder in map(Path, sys.argv[3:]):
    entry = json.loads((folder / "student.json").read_text())["diffusers"]
    pipe = getattr(diffusers, entry["pipeline"]).from_pretrained(
        folder, dtype=torch.float32, **entry.get("from_pretrained", {}))
    pipe.set_progress_bar_config(disable=True)
    images = [pipe(p, generator=torch.Generator().manual_seed(s), output_type="np",
                   **entry["call"]).images[0] for p, s in zip(prompts, seeds)]
    out = folder.parent / f"{folder.name}.plain"  # beside the folder: it stays as saved
    np.save(f"{out}.npy", (np.stack(images) * 255).round().astype(np.uint8))
    Path(f"{out}.pipeline").write_text(entry["pipeline"])
"""


def run_plain_user(folders, prompts=PROMPTS, seeds=SEEDS) -> None:
    """Generate with the call each folder's ``student.json`` names, in one process that imports
    nothing of the project; each folder ``F`` gets ``F.plain.npy`` beside it."""
    folders = [str(Path(f).resolve()) for f in folders]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", PLAIN_USER, json.dumps(list(prompts)),
                           json.dumps(list(seeds)), *folders], cwd=Path(folders[0]).parent,
                          env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


def plain_images(folder, pipeline: str = "StableDiffusion3Pipeline") -> np.ndarray:
    """What ``run_plain_user`` got from ``folder``, with the pipeline class it used."""
    out = Path(folder).parent / f"{Path(folder).name}.plain"
    assert Path(f"{out}.pipeline").read_text() == pipeline
    return np.load(f"{out}.npy")


def stock_images(folder, prompts=PROMPTS, seeds=SEEDS,
                 pipeline: str = "StableDiffusion3Pipeline") -> np.ndarray:
    """What a plain diffusers user gets from ``folder`` (``run_plain_user``)."""
    run_plain_user([folder], prompts, seeds)
    return plain_images(folder, pipeline)


def _save_students(base, build):
    """Every generator kind of ``KINDS`` saved from the tiny pipeline ``build`` under ``base``,
    and what the plain diffusers user gets from each."""
    for name, spec in KINDS.items():
        pipe = build(0)
        if spec.w_dim:
            _, pipe.transformer, spec = saved_network(_w_student(pipe), spec)
        save_student(pipe, spec, base / name, {"method": name})
    run_plain_user([base / name for name in KINDS])
    return base


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    return _save_students(tmp_path_factory.mktemp("flow-students"), tiny_sd3_pipeline)


FLUX_KINDS = {"one_step": GeneratorSpec(), "one_step_t500": GeneratorSpec(t=500),
              "rectified_flow": GeneratorSpec(kind="rectified_flow", steps=2)}


@pytest.fixture(scope="module")
def flux_students(tmp_path_factory):
    from tests.tiny_flow import tiny_flux_pipeline

    base = tmp_path_factory.mktemp("flux-students")
    for name, spec in FLUX_KINDS.items():
        save_student(tiny_flux_pipeline(0), spec, base / name, {"method": name})
    run_plain_user([base / name for name in FLUX_KINDS])
    return base


@pytest.mark.parametrize("name", sorted(FLUX_KINDS))
def test_stock_flux_pipeline_reproduces_the_student(flux_students, name):
    """FluxPipeline at the student's resolution (which sets the scheduler's shift), its
    guidance input at 1 and no true CFG, on the tiny FLUX.1-dev-style pipeline."""
    call = json.loads((flux_students / name / "student.json").read_text())["diffusers"]["call"]
    assert call["height"] == call["width"] and call["guidance_scale"] == 1.0
    ours = load_student(flux_students / name).generate(PROMPTS, SEEDS)
    stock = plain_images(flux_students / name, pipeline="FluxPipeline")
    diff = np.abs(ours.astype(int) - stock.astype(int)).max()
    assert diff <= 1, f"{name}: FluxPipeline differs from Student.generate by {diff}"
    assert ours.std() > 0


@pytest.mark.parametrize("name", sorted(KINDS))
def test_stock_sd3_pipeline_reproduces_the_student(students, name):
    ours = load_student(students / name).generate(PROMPTS, SEEDS)
    diff = np.abs(ours.astype(int) - plain_images(students / name).astype(int)).max()
    assert diff <= 1, f"{name}: StableDiffusion3Pipeline differs from Student.generate by {diff}"
    assert ours.std() > 0


@pytest.fixture(scope="module")
def sana_students(tmp_path_factory):
    return _save_students(tmp_path_factory.mktemp("sana-students"), tiny_sana_pipeline)


@pytest.mark.parametrize("name", sorted(KINDS))
def test_stock_sana_pipeline_reproduces_the_student(sana_students, name):
    """SanaPipeline with the saved Euler twin of SANA's flow DPM-Solver, at the student's
    resolution, its default instruction before each prompt and no CFG."""
    entry = json.loads((sana_students / name / "student.json").read_text())["diffusers"]
    assert entry["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert entry["call"]["use_resolution_binning"] is False
    ours = load_student(sana_students / name).generate(PROMPTS, SEEDS)
    stock = plain_images(sana_students / name, pipeline="SanaPipeline")
    diff = np.abs(ours.astype(int) - stock.astype(int)).max()
    assert diff <= 1, f"{name}: SanaPipeline differs from Student.generate by {diff}"
    assert ours.std() > 0


@pytest.mark.parametrize("build", [tiny_sd3_pipeline, tiny_sana_pipeline],
                         ids=["sd3", "sana"])
def test_the_folded_w_input_is_the_w_conditioned_student(build):
    pipe = build(0)
    net, spec = _w_student(pipe), KINDS["w_conditioned_ddim"]
    live = Student(pipe, spec)
    live.denoiser = net  # the network as it trained, w through its projection
    _, folded, plain = saved_network(net, spec)
    assert plain.w_dim == 0 and net.transformer is not folded
    want = live.generate(PROMPTS, SEEDS)
    pipe.transformer = folded
    assert np.abs(Student(pipe, plain).generate(PROMPTS, SEEDS).astype(int)
                  - want.astype(int)).max() <= 1
    pipe.transformer = net.transformer  # w = 0 changes the images: the fold carried w
    assert np.abs(Student(pipe, plain).generate(PROMPTS, SEEDS).astype(int)
                  - want.astype(int)).max() > 4


def test_sid_students_say_why_the_stock_call_cannot_reproduce_them(tmp_path):
    save_student(tiny_sd3_pipeline(0), GeneratorSpec(t=625, input_scale="sigma"), tmp_path / "s",
                 {"method": "sid_lsg"})
    entry = json.loads((tmp_path / "s/student.json").read_text())["diffusers"]
    assert entry["reproduces_student"] is False and "unscaled noise" in entry["reason"]


def test_encoded_latents_decode_to_the_posterior_sample(tmp_path):
    """Encoding writes ``(z − shift) · scale`` and decoding reads it back: an image's encoded
    latents decode to exactly what the VAE decodes from the same posterior sample z."""
    pipe = tiny_sd3_pipeline(0)
    photos(1, seed=4, sizes=((16, 16),))[0].save(tmp_path / "a.png")
    real = encode_images(pipe, [tmp_path / "a.png"], ["a red circle"], (8, 8), seed=5)
    from components.real_latents import load_image

    pixels = load_image(tmp_path / "a.png", (16, 16))[0][None]
    vae = pipe.vae
    with torch.no_grad():
        z = vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(5))
        x = vae.decode(z, return_dict=False)[0]
    want = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(decode_latents(pipe, real.latents).astype(int) - want.astype(int)).max() <= 1
    assert vae.config.shift_factor and not torch.allclose(real.latents,
                                                          z * vae.config.scaling_factor)
