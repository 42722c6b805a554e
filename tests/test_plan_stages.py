"""Plans of cache_teacher and evaluate (components/planning/stages.py, ``pipeline.plan --stage``)
on a tiny teacher folder: traced forward FLOPs equal a real CPU forward's, and each stage counts
the calls it makes (guided teacher steps, student steps, decodes, text encodings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from components.planning.kernels import ATTENTION_FLOPS
from components.planning.stages import guided_call, student_call
from components.teacher import TextConditioning
from pipeline import plan as plan_cli
from tests.tiny import build_tiny_teacher


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plan-stages")
    build_tiny_teacher(root / "models/teacher")
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["evaluate"].update(num_images=40, curve_guidance_scales=[2.0, 4.0], batch_size=4,
                              teacher_steps=5)
    params["cache"]["pairs"].update(count=24, steps=3, batch_size=8)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def _plan(root: Path, tmp: Path, *args: str) -> dict:
    out = tmp / "plan.json"
    plan_cli.main(["--root", str(root), *args, "--out", str(out)])
    return json.loads(out.read_text())


def test_a_traced_step_has_the_flops_of_a_real_forward(project):
    from diffusers import UNet2DConditionModel

    spec = plan_cli.teacher_spec(plan_cli.stage_configs(project, None, None)["teacher"],
                                 project)
    guided, student = guided_call(spec, 2, False), student_call(spec, 2, False)
    assert guided.flops_per_image == pytest.approx(2 * student.flops_per_image)  # [uncond; cond]
    unet = UNet2DConditionModel.from_pretrained(project / "models/teacher", subfolder="unet")
    dim = unet.config.cross_attention_dim
    # the CPU's fused attention kernel counted by the same formulas as the trace's
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter:
        unet(torch.zeros(2, *spec.latent), torch.tensor([999, 999]),
             TextConditioning(torch.zeros(2, 77, dim)).text)
    assert student.flops_per_image == pytest.approx(counter.get_total_flops() / 2, rel=1e-6)
    assert student.weight_bytes == 4 * sum(p.numel() for p in unet.parameters())


def test_evaluate_counts_teacher_curve_student_and_decodes(project, tmp_path, capsys):
    plan = _plan(project, tmp_path, "--stage", "evaluate")
    calls = {c["name"]: c for c in plan["calls"]}
    teacher, student, decode = (calls[k] for k in ("teacher step (CFG)", "student step",
                                                    "VAE decode"))
    # 40 images for the student, 40 x (1 + 2 curve scales) for the teacher at 5 steps each
    assert (teacher["calls_per_item"], teacher["items"]) == (5, 120)
    assert (student["calls_per_item"], student["items"]) == (1, 40)
    assert (decode["calls_per_item"], decode["items"]) == (1, 40 * 4)
    assert plan["tflop"]["teacher step (CFG)"] == pytest.approx(
        teacher["tflop_per_image"] * 5 * 120, rel=1e-3)
    assert plan["tflop"]["text encoding"] > 0 and plan["fits"]
    rate = plan["tflop"]["student step"] / plan["seconds"]["student step"]  # TFLOP/s
    assert rate == pytest.approx(plan["tflop"]["VAE decode"] / plan["seconds"]["VAE decode"],
                                 rel=1e-3)
    assert any("not traced" in n for n in plan["notes"])
    printed = capsys.readouterr().out
    assert "evaluate on H100" in printed and "GPU-hours" in printed
    more = _plan(project, tmp_path, "--stage", "evaluate", "--images", "80")
    assert more["tflop"]["student step"] == pytest.approx(2 * plan["tflop"]["student step"],
                                                          rel=1e-3)


def test_cache_teacher_counts_pairs_only_for_pair_methods(project, tmp_path):
    pairs = _plan(project, tmp_path, "--stage", "cache_teacher", "--method", "instaflow",
                  "--prompts", "1000")
    (step,) = pairs["calls"]
    assert (step["calls_per_item"], step["items"], step["batch"]) == (3, 24, 8)
    assert pairs["tflop"]["text encoding"] > 0
    none = _plan(project, tmp_path, "--stage", "cache_teacher", "--method", "sid_lsg",
                 "--prompts", "1000")
    assert none["calls"] == [] and "teacher step (CFG)" not in none["tflop"]
    # encoding on the fly leaves the prompts to distill
    fly = _plan(project, tmp_path, "--stage", "cache_teacher", "--method", "sid_lsg",
                "--prompts", "1000", "--text-embeddings", "on_the_fly")
    assert "text encoding" not in fly["tflop"]
    assert any("encoded by distill" in n for n in fly["notes"])


def test_evaluate_without_an_image_count_says_how_to_give_one(project, tmp_path):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["evaluate"]["num_images"] = None
    root = tmp_path / "p"
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "models").symlink_to(project / "models")
    with pytest.raises(SystemExit) as stop:
        plan_cli.main(["--root", str(root), "--stage", "evaluate"])
    assert "pass --images N" in str(stop.value.code)
