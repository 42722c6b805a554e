"""Forward paths of generation and caching on fake ``cuda`` tensors (``FakeTensorMode``, no GPU
needed): a tensor left on the CPU next to the networks' CUDA tensors raises here as it would on
a GPU. The networks are built inside the mode (a real module cannot be moved into it)."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from components.batches import ConditioningTable, PromptBatches
from components.generation import (
    GeneratorSpec,
    encode_prompts,
    generate_latents,
    latent_shape,
    unconditional,
)
from components.teacher import TextConditioning, teacher_denoiser
from components.training import step_generator
from tests.tiny import tiny_pipeline, tiny_sdxl_pipeline

SPECS = [GeneratorSpec(), GeneratorSpec(input_scale="sigma", t=625),
         GeneratorSpec(kind="rectified_flow", steps=2), GeneratorSpec(kind="ddim", steps=2)]


def _fields(cond) -> list[torch.Tensor]:
    return [a for a in (cond.text, cond.pooled, cond.time_ids) if a is not None]


@pytest.mark.parametrize("build", [tiny_pipeline, tiny_sdxl_pipeline], ids=["sd", "sdxl"])
def test_prompt_encoding_and_student_generation_stay_on_cuda(build):
    with FakeTensorMode(), torch.no_grad():
        with torch.device("cuda"):
            pipe = build()
        cond = encode_prompts(pipe, ["a red circle", "a blue square"])
        null = unconditional(pipe)
        assert all(a.device.type == "cuda" for a in _fields(cond) + _fields(null))
        denoiser = teacher_denoiser(pipe)
        z = torch.randn(2, *latent_shape(pipe), device="cuda")
        for spec in SPECS if build is tiny_pipeline else SPECS[:1]:
            x0 = generate_latents(denoiser, z, cond, spec)
            assert x0.device.type == "cuda" and x0.shape == z.shape, spec
        vae = pipe.vae
        images = vae.decode(x0 / vae.config.scaling_factor, return_dict=False)[0]
        assert images.device.type == "cuda" and images.shape[1] == 3


def test_prompt_batches_are_handed_over_on_the_training_device_and_dtype():
    with FakeTensorMode():
        table = ConditioningTable(TextConditioning(torch.zeros(6, 77, 32, dtype=torch.float16)))
        batches = PromptBatches(table, TextConditioning(torch.zeros(1, 77, 32)), (4, 8, 8),
                                "cuda", torch.bfloat16)
        batch = batches(4, step_generator(0, 0), 0)
        assert batch.cond.text.device.type == batch.z.device.type == "cuda"
        assert batch.uncond.text.device.type == "cuda" and batch.cond.text.dtype == torch.bfloat16
