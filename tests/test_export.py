"""Exports (``python -m pipeline.export``): a diffusers folder, a LoRA file and an original-layout
single-file checkpoint that diffusers' own ``from_single_file`` loads back weight for weight, on
tiny random pipelines with the real SD1.x and SDXL layouts, and the SD3 (MMDiT), FLUX (BFL) and
SANA transformer layouts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from components.generation import GeneratorSpec, load_student
from components.student import StudentConfig, save_lora_student, student_network
from components.teacher import teacher_denoiser
from pipeline.export import main
from tests.tiny import build_tiny_student, tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
LORA = StudentConfig(kind="lora", rank=4, alpha=4.0, targets=("to_q", "to_v", "conv1"))
PROMPTS, SEEDS = ["a red circle"], [5]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    sa, sb = a.state_dict(), b.state_dict()
    return [k for k in sa if k not in sb or sb[k].is_meta or not torch.equal(sa[k], sb[k])]


@pytest.fixture(scope="module")
def lora_student(tmp_path_factory) -> dict:
    """A LoRA student with non-zero adapters (as after training), saved by the stage's writer."""
    tmp = tmp_path_factory.mktemp("export")
    tiny_pipeline().save_pretrained(tmp / "teacher")
    torch.manual_seed(1)
    network = student_network(teacher_denoiser(tiny_pipeline()), LORA)
    for name, p in network.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    from diffusers import StableDiffusionPipeline

    save_lora_student(StableDiffusionPipeline.from_pretrained(tmp / "teacher"), network, LORA,
                      GeneratorSpec(), tmp / "student", {"method": "dmd2"})
    main(["--student", str(tmp / "student"), "--out", str(tmp / "out"), "--precision", "fp32"])
    return {"tmp": tmp, "out": tmp / "out", "student": tmp / "student"}


def test_a_lora_student_exports_all_three_formats(lora_student):
    out = lora_student["out"]
    assert sorted(p.name for p in out.iterdir()) == ["diffusers", "student.safetensors",
                                                     "student_lora.safetensors"]
    ours = load_student(lora_student["student"]).generate(PROMPTS, SEEDS)
    assert np.array_equal(load_student(out / "diffusers").generate(PROMPTS, SEEDS), ours)


def test_the_lora_file_on_the_teacher_is_the_student(lora_student):
    from diffusers import StableDiffusionPipeline

    exact = load_student(lora_student["student"], base=lora_student["tmp"] / "teacher")
    pipe = StableDiffusionPipeline.from_pretrained(lora_student["tmp"] / "teacher")
    pipe.load_lora_weights(str(lora_student["out"]), weight_name="student_lora.safetensors")
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([999])
    c = torch.randn(1, 77, 32)
    with torch.no_grad():
        assert torch.equal(pipe.unet(x, t, c).sample, exact.pipe.unet(x, t, c).sample)


def test_single_file_round_trips_through_from_single_file(lora_student):
    from diffusers import StableDiffusionPipeline

    path = lora_student["out"] / "student.safetensors"
    keys = load_file(str(path)).keys()
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    back = StableDiffusionPipeline.from_single_file(
        str(path), config=str(lora_student["out"] / "diffusers"), local_files_only=True)
    full = StableDiffusionPipeline.from_pretrained(lora_student["student"])
    for part in ("unet", "vae", "text_encoder"):
        assert not _same_weights(getattr(full, part), getattr(back, part)), part


def _tiny_sdxl(folder: Path):
    """A tiny SDXL pipeline whose two text encoders differ in width, as CLIP-L (768) and
    OpenCLIP bigG (1280) do: ``from_single_file`` tells them apart by that width."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from tests.tiny import tiny_sdxl_pipeline

    base = tiny_sdxl_pipeline(0)
    torch.manual_seed(2)
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407, projection_dim=32))
    unet_config = {**base.unet.config, "cross_attention_dim": 80}
    unet = type(base.unet).from_config(unet_config)
    pipe = StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoder,
                                     text_encoder_2=text_2, tokenizer=base.tokenizer,
                                     tokenizer_2=base.tokenizer_2, unet=unet,
                                     scheduler=base.scheduler, force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(folder)
    return pipe


def test_sdxl_single_file_round_trips_with_openclip_layout(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from components.export import export_single_file
    from components.generation import save_student

    pipe = _tiny_sdxl(tmp_path / "config")
    save_student(pipe, GeneratorSpec(), tmp_path / "student", {"method": "dmd2"})
    path = export_single_file(tmp_path / "student", tmp_path / "xl.safetensors", "fp32")
    keys = load_file(str(path))
    assert "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight" in keys
    assert keys["conditioner.embedders.1.model.text_projection"].shape == (48, 32)
    back = StableDiffusionXLPipeline.from_single_file(str(path), config=str(tmp_path / "config"),
                                                      local_files_only=True)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert not _same_weights(getattr(pipe, part), getattr(back, part)), part


def test_fp16_is_the_default_single_file_precision(tmp_path):
    student = build_tiny_student(tmp_path / "student")
    main(["--student", str(student), "--out", str(tmp_path / "out"), "--format", "single-file"])
    tensors = load_file(str(tmp_path / "out" / "student.safetensors"))
    assert {v.dtype for v in tensors.values()} == {torch.float16}


def test_a_full_student_has_no_lora_to_export(tmp_path, capsys):
    student = build_tiny_student(tmp_path / "student")
    with pytest.raises(SystemExit) as stop:
        main(["--student", str(student), "--out", str(tmp_path / "out"), "--format", "lora"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "full student" in err and "distill.student" in err
    assert not (tmp_path / "out" / "student_lora.safetensors").exists()


def test_a_registered_student_exports(tmp_path):
    from components.registry.gate import Lineage, RegisterConfig
    from components.registry.store import artifact_location, register_student

    student = build_tiny_student(tmp_path / "student")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    register_student(RegisterConfig(model_name="m", experiment="e", fid_margin=1.0,
                                    clip_tolerance=0.25), student,
                     {"fid": 5.0, "clip_score": 0.2}, Lineage("abc", "x", "tiny", "ph", "p"),
                     uri=uri, artifact_root=artifact_location(tmp_path, uri))
    main(["--model", "models:/m@candidate", "--tracking-uri", uri, "--out", str(tmp_path / "o"),
          "--format", "diffusers"])
    images = load_student(tmp_path / "o" / "diffusers").generate(PROMPTS, SEEDS)
    assert np.array_equal(images, load_student(student).generate(PROMPTS, SEEDS))


def test_help_names_every_format():
    proc = subprocess.run([sys.executable, "-m", "pipeline.export", "--help"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    assert all(fmt in proc.stdout for fmt in ("diffusers", "lora", "single-file"))


class _TinyFluxSplit:
    """``torch`` for diffusers' FLUX converter, whose one width-specific step splits each single
    block's ``linear1`` at FLUX.1's sizes (3072 × 3 + 12288, written as constants); at the tiny
    width ``d`` the same split is (d, d, d, 4d). A FLUX.1-width block is too big for a CPU test."""

    def __init__(self, width: int):
        self.width = width

    def __getattr__(self, name):
        return getattr(torch, name)

    def split(self, tensor, sizes, dim=0):
        if tuple(sizes) == (3072, 3072, 3072, 12288):
            sizes = [self.width] * 3 + [4 * self.width]
        return torch.split(tensor, sizes, dim=dim)


FLOW_KEYS = {  # a key of each family the tiny configs exercise: QK norm, SD3.5's dual attention,
    # the text-pre-only last block; FLUX's guidance embedding and fused single-block linear1
    "sd3": ("model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight",
            "model.diffusion_model.joint_blocks.0.context_block.attn.ln_q.weight",
            "model.diffusion_model.joint_blocks.1.context_block.adaLN_modulation.1.weight",
            "model.diffusion_model.pos_embed", "model.diffusion_model.y_embedder.mlp.0.weight"),
    "flux": ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight",
             "guidance_in.in_layer.weight", "double_blocks.0.txt_attn.norm.key_norm.scale"),
    "sana": ("blocks.0.attn.qkv.weight", "blocks.0.cross_attn.kv_linear.bias",
             "y_embedder.y_embedding", "final_layer.scale_shift_table"),
}


def _flow_student(family: str, folder: Path):
    from components.generation import save_student
    from tests import tiny_flow

    build = {"sd3": tiny_flow.tiny_sd3_pipeline, "flux": tiny_flow.tiny_flux_pipeline,
             "sana": tiny_flow.tiny_sana_pipeline}[family]
    pipe = build(0)
    save_student(pipe, GeneratorSpec(), folder, {"method": "dmd2"})
    return pipe


@pytest.mark.parametrize("family", sorted(FLOW_KEYS))
def test_flow_single_file_round_trips_through_from_single_file(tmp_path, monkeypatch, family):
    from diffusers.loaders import single_file_utils

    from components.export import export_single_file

    pipe = _flow_student(family, tmp_path / "student")
    path = export_single_file(tmp_path / "student", tmp_path / "t.safetensors", "fp32")
    keys = load_file(str(path)).keys()
    assert set(FLOW_KEYS[family]) <= keys
    assert not any(k.startswith(("text_encoder", "vae", "first_stage_model")) for k in keys)
    if family == "flux":
        width = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
        monkeypatch.setattr(single_file_utils, "torch", _TinyFluxSplit(width))
    back = type(pipe.transformer).from_single_file(
        str(path), config=str(tmp_path / "student"), subfolder="transformer",
        local_files_only=True)
    assert not _same_weights(pipe.transformer, back)


def test_flow_single_file_is_fp16_by_default(tmp_path):
    _flow_student("sd3", tmp_path / "student")
    main(["--student", str(tmp_path / "student"), "--out", str(tmp_path / "out"),
          "--format", "single-file"])
    tensors = load_file(str(tmp_path / "out" / "student.safetensors"))
    assert {v.dtype for v in tensors.values()} == {torch.float16}
    assert all(k.startswith("model.diffusion_model.") for k in tensors)


def test_a_transformer_family_without_a_layout_says_what_is_supported():
    from components.flow_layout import transformer_to_original

    with pytest.raises(ValueError) as err:
        transformer_to_original("hidream", torch.nn.Linear(2, 2))
    message = str(err.value)
    assert all(name in message for name in ("StableDiffusion3Pipeline", "FluxPipeline",
                                            "SanaPipeline", "--format diffusers"))
