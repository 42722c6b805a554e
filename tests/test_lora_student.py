"""LoRA students (``distill.student: lora``): strict config, only the adapters train, and the
saved diffusers LoRA loaded onto the teacher by a plain diffusers process gives the project's
student bit for bit."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from components.config import ConfigError, from_dict
from components.generation import Student, load_student
from components.methods import Teacher, get_method
from components.student import LORA_FILE, LORA_FOLDER, StudentConfig, save_lora_student
from components.teacher import teacher_denoiser
from components.training import LoopConfig, checkpoint_weights, train
from pipeline.params import DistillConfig
from tests.test_methods_tiny import LATENT, PROMPTS, _cache
from tests.tiny import tiny_pipeline

LORA = StudentConfig(kind="lora", rank=4, alpha=8.0, targets=("to_q", "to_k", "to_v",
                                                               "to_out.0", "conv1", "conv2"))
SEEDS = [3, 11]
# A plain diffusers user: nothing of the project importable; the teacher folder, the LoRA and
# the stock call that student.json names.
PLAIN_USER = """
import json, sys
from pathlib import Path
import numpy as np, torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
assert not any(m.split(".")[0] in ("components", "pipeline", "tests") for m in sys.modules)
teacher, student, prompts, seeds = sys.argv[1], Path(sys.argv[2]), *map(json.loads, sys.argv[3:])
call = json.loads((student / "student.json").read_text())["diffusers"]["call"]
pipe = StableDiffusionPipeline.from_pretrained(teacher, torch_dtype=torch.float32)
pipe.scheduler = DDIMScheduler.from_pretrained(student, subfolder="scheduler")
pipe.load_lora_weights(student / "lora")
pipe.set_progress_bar_config(disable=True)
images = [pipe(p, generator=torch.Generator().manual_seed(s), output_type="np",
               **call).images[0] for p, s in zip(prompts, seeds)]
np.save(student / "plain.npy", (np.stack(images) * 255).round().astype(np.uint8))
"""


def _distill(**student) -> dict:
    return {"method": "dmd2", "loop": {}, "student": student}


@pytest.mark.parametrize("student, message", [
    ({"kind": "lora", "rank": 0}, "student.rank must be at least 1"),
    ({"kind": "lora", "alpha": -1.0}, "alpha must be > 0"),
    ({"kind": "lora", "targets": []}, "student.targets must name at least one"),
    ({"kind": "qlora"}, "expected one of 'full', 'lora'"),
    ({"kind": "lora", "ranks": 4}, "valid keys are: alpha, kind, rank, targets"),
])
def test_bad_student_settings_fail_at_load_with_one_line(student, message):
    with pytest.raises(ConfigError, match=message) as err:
        from_dict(DistillConfig, _distill(**student), "distill")
    assert "\n" not in str(err.value) and "distill.student" in str(err.value)


@pytest.mark.parametrize("method, why", [("meng", "guidance-weight embedding"),
                                         ("instaflow", "velocity field")])
def test_pair_methods_say_why_a_lora_student_does_not_apply(method, why):
    with pytest.raises(ConfigError, match=f"does not apply to method '{method}'.*{why}"):
        from_dict(DistillConfig, {**_distill(kind="lora"), "method": method}, "distill")
    assert from_dict(DistillConfig, {**_distill(), "method": method}, "distill").student.kind \
        == "full"


@pytest.mark.parametrize("name", ["swiftbrush", "sid_lsg", "dmd2"])
def test_score_methods_train_only_the_adapters_of_a_lora_student(name):
    cfg_cls, build = get_method(name)
    method = build(cfg_cls(), Teacher(teacher_denoiser(tiny_pipeline()), student=LORA), 4)
    student = method.parameters(method.student_groups[0])
    names = {id(p): n for n, p in method.student().named_parameters()}
    assert student and all("lora_" in names[id(p)] for p in student)
    assert sum(p.numel() for p in student) < 0.2 * sum(
        p.numel() for p in method.student().parameters())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A DMD2 LoRA student trained 3 iterations through the real loop, saved by the stage's
    writer next to its teacher folder."""
    tmp = tmp_path_factory.mktemp("lora")
    teacher_dir = tmp / "teacher"
    tiny_pipeline().save_pretrained(teacher_dir)
    pipe = tiny_pipeline()
    cfg_cls, build = get_method("dmd2")
    method = build(cfg_cls(generator_lr=1e-2, fake_lr=1e-3, gen_update_ratio=1, warmup_steps=0),
                   Teacher(teacher_denoiser(pipe), student=LORA), 3)
    from components.batches import PromptBatches

    batches = PromptBatches.from_cache(_cache(tmp, pipe), LATENT)
    loop = LoopConfig(steps=3, batch_size=2, log_every=1, sample_every=3, checkpoint_every=3)
    train(method, batches, loop, tmp / "ckpt", lambda m, s: None, lambda s, k: None)
    from diffusers import StableDiffusionPipeline

    student_dir = tmp / "student"
    save_lora_student(StableDiffusionPipeline.from_pretrained(teacher_dir), method.student(),
                      LORA, method.spec, student_dir, {"method": "dmd2"})
    ours = copy.copy(tiny_pipeline())
    ours.unet = method.student().unet  # the trained network itself, adapters unfused
    return {"tmp": tmp, "teacher": teacher_dir, "student": student_dir, "method": method,
            "ours": Student(ours, method.spec).generate(PROMPTS[:2], SEEDS)}


def test_checkpoint_holds_only_the_adapters_and_the_base_stays_the_teacher(trained):
    state = checkpoint_weights(trained["tmp"] / "ckpt", "generator")
    assert state and all("lora_" in k for k in state)
    teacher = tiny_pipeline().unet.state_dict()
    for key, value in trained["method"].student().unet.state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, teacher[key.replace("base_layer.", "")]), key
    assert any(v.abs().max() > 0 for k, v in state.items() if "lora_B" in k)  # it trained


def test_plain_diffusers_lora_on_the_teacher_is_the_student_bit_for_bit(trained, tmp_path):
    student = trained["student"]
    meta = json.loads((student / "student.json").read_text())
    assert meta["student"] == {**LORA.describe(), "rank": 4}
    assert (student / LORA_FOLDER / LORA_FILE).exists()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", PLAIN_USER, str(trained["teacher"]),
                           str(student), json.dumps(PROMPTS[:2]), json.dumps(SEEDS)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = np.load(student / "plain.npy")
    ours = trained["ours"]
    assert ours.std() > 0 and np.array_equal(plain, ours)
    exact = load_student(student, base=trained["teacher"]).generate(PROMPTS[:2], SEEDS)
    assert np.array_equal(exact, ours)


def test_the_full_weight_folder_is_the_fused_lora(trained):
    fused = load_student(trained["student"]).generate(PROMPTS[:2], SEEDS)
    assert np.abs(fused.astype(int) - trained["ours"].astype(int)).max() <= 1
    unet = json.loads((trained["student"] / "unet" / "config.json").read_text())
    assert "peft" not in json.dumps(unet).lower()


def test_a_registered_lora_student_loads_through_mlflow_diffusers(trained, tmp_path, monkeypatch):
    import mlflow.diffusers

    from components.registry.gate import Lineage, RegisterConfig
    from components.registry.store import artifact_location, register_student

    monkeypatch.setenv("MLFLOW_DEFAULT_PREDICTION_DEVICE", "cpu")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = register_student(
        RegisterConfig(model_name="lora-m", experiment="e", fid_margin=1.0, clip_tolerance=0.25), trained["student"],
        {"fid": 5.0, "clip_score": 0.2}, Lineage("abc", "dmd2", "tiny", "ph", "p"), uri=uri,
        artifact_root=artifact_location(tmp_path, uri), base_model=str(trained["teacher"]))
    assert result["lora_model_uri"]
    mlflow.set_tracking_uri(uri)
    try:
        adapter = mlflow.diffusers.load_model(result["lora_model_uri"])
        pipe = adapter.load_pipeline(torch_dtype=torch.float32)
    finally:
        mlflow.set_tracking_uri(None)
    assert adapter.base_model == str(trained["teacher"].resolve())
    pipe.set_progress_bar_config(disable=True)
    images = Student(pipe, trained["method"].spec).generate(PROMPTS[:2], SEEDS)
    assert np.array_equal(images, trained["ours"])
