"""Random-weight SD1.5 / SD2.1 / SDXL pipelines with the real architectures (nothing downloaded).

Full-size configs are checked by parameter count on the meta device; the built and saved
pipelines are narrowed (divisor 8) so that loading and running them takes seconds on a CPU.
"""

from __future__ import annotations

import pytest
import torch

from components.architectures import (
    ARCHS,
    build_pipeline,
    count_unet_parameters,
    text_configs,
    unet_config,
)
from components.generation import encode_prompts
from components.teacher import TeacherConfig, TextConditioning, load_pipeline, teacher_denoiser
from pipeline.build_sd import main as build_sd


# Parameter counts of the UNets of the released checkpoints (sum of the tensor sizes in
# stable-diffusion-v1-5, stable-diffusion-2-1 and stable-diffusion-xl-base-1.0 unet weights).
@pytest.mark.parametrize("arch, expected", [("sd15", 859_520_964), ("sd21", 865_910_724),
                                            ("sdxl", 2_567_463_684)])
def test_full_size_unet_parameter_counts(arch, expected):
    assert count_unet_parameters(arch) == expected


def test_text_encoders_of_each_architecture():
    widths = {a: [c["hidden_size"] for c in text_configs(a)] for a in ARCHS}
    assert widths == {"sd15": [768], "sd21": [1024], "sdxl": [768, 1280]}
    assert unet_config("sdxl")["cross_attention_dim"] == 768 + 1280


def test_unknown_architecture_and_divisor_are_clear_errors():
    with pytest.raises(ValueError, match="valid: sd15, sd21, sdxl"):
        unet_config("sd3")
    with pytest.raises(ValueError, match="divisor must be one of"):
        unet_config("sd15", divisor=3)


def _sdxl_conditioning(pipe, prompts: list[str]) -> TextConditioning:
    text, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * len(prompts), dtype=torch.float32)
    return TextConditioning(text, pooled, time_ids)


@pytest.mark.parametrize("arch", ARCHS)
def test_built_pipeline_saves_and_loads_through_the_teacher_loader(arch, tmp_path):
    out = tmp_path / arch
    build_sd(["--arch", arch, "--out", str(out), "--divisor", "8"])
    pipe = load_pipeline(TeacherConfig(model=str(out)), tmp_path)
    assert type(pipe).__name__ == ("StableDiffusionXLPipeline" if arch == "sdxl"
                                   else "StableDiffusionPipeline")
    reference = build_pipeline(arch, divisor=8)
    for a, b in zip(pipe.unet.state_dict().values(), reference.unet.state_dict().values()):
        assert torch.equal(a, b)  # seeded build, saved and reloaded exactly
    prompts = ["a red circle", ""]
    with torch.no_grad():
        cond = (_sdxl_conditioning(pipe, prompts) if arch == "sdxl"
                else encode_prompts(pipe, prompts))
        denoiser = teacher_denoiser(pipe)
        size = pipe.unet.config.sample_size
        x = torch.randn(2, 4, size, size)
        out_t = denoiser(x, torch.tensor([999, 500]), cond)
    assert out_t.shape == x.shape and torch.isfinite(out_t).all()
    assert denoiser.prediction_type == ("v_prediction" if arch == "sd21" else "epsilon")
