"""Every method trains and resumes on tiny random SD3.5-style, FLUX.1-dev-style and SANA-style
pipelines, through the same loop, caches and loaders as the UNet teachers."""

from __future__ import annotations

import copy

import pytest
import torch

from components.batches import PairBatches, PromptBatches
from components.config import from_dict
from components.embed_cache import CacheConfig, EmbeddingCache, write_cache
from components.generation import encode_prompts, generate_latents
from components.methods import Teacher, get_method, method_names
from components.teacher import teacher_denoiser
from components.training import LoopConfig, train
from tests.memory_pairs import MemoryPairs
from tests.tiny_flow import LATENT, tiny_flux_pipeline, tiny_sana_pipeline, tiny_sd3_pipeline

PROMPTS = ["a red circle", "a blue square", "a green triangle on the left", "a yellow circle"]
PIPELINES = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline, "sana": tiny_sana_pipeline}

# Small settings so a few steps move the weights; everything else is the published default.
SETTINGS = {
    "swiftbrush": {"student_lr": 1e-3, "lora_rank": 4, "lora_alpha": 4},
    "dmd2": {"generator_lr": 1e-3, "fake_lr": 1e-3, "gen_update_ratio": 1, "warmup_steps": 2},
    "sid_lsg": {"generator_lr": 1e-3, "fake_lr": 1e-3},
    "instaflow": {"lr": 1e-3, "reflow_fraction": 0.5, "distill_ode_steps": 2,
                  "lpips_fraction": 0.0, "warmup_steps": 0},
    "meng": {"lr": 1e-3, "w_dim": 8, "stage1_fraction": 0.5, "start_steps": 2,
             "final_steps": 1},
}
# FLUX.1-dev is guidance-distilled: its guidance input is stage 1's w input already
FAMILY_SETTINGS = {("flux", "meng"): {"stage1_fraction": 0.0}}


def _settings(family: str, name: str) -> dict:
    return {**SETTINGS[name], **FAMILY_SETTINGS.get((family, name), {})}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Each family's pipeline and its prompt cache (pooled and sequence embeddings)."""
    out = {}
    for family, build in PIPELINES.items():
        pipe = build()
        folder = tmp_path_factory.mktemp(family) / "cache"
        write_cache(folder, [*PROMPTS, ""], lambda p, pipe=pipe: encode_prompts(pipe, p),
                    CacheConfig(shard_size=3), family, log=lambda _: None)
        out[family] = (pipe, EmbeddingCache(folder))
    return out


def _run(family, name, teachers, steps, ckpt, total=None, checkpoint_every=10**9):
    pipe, cache = teachers[family]
    cfg_cls, build = get_method(name)
    teacher = teacher_denoiser(pipe, latent_hw=LATENT[1:])
    # a fresh copy per run: methods change their teacher network (LoRA, requires_grad);
    # the seed fixes the weights a method initialises at random (LoRA)
    torch.manual_seed(0)
    method = build(from_dict(cfg_cls, _settings(family, name), name),
                   Teacher(copy.deepcopy(teacher)), total or steps)
    if method.needs_pairs:
        batches = PairBatches(cache, cache.null(1), MemoryPairs(teacher, cache, LATENT), LATENT)
    else:
        batches = PromptBatches.from_cache(cache, LATENT)
    logs = []
    loop = LoopConfig(steps=steps, batch_size=2, grad_accum=1, log_every=1,
                      sample_every=100, checkpoint_every=checkpoint_every)
    train(method, batches, loop, ckpt, lambda m, s: logs.append((s, m)), lambda module, s: None)
    return method, logs


def test_every_method_is_tested_here():
    assert sorted(SETTINGS) == method_names()


@pytest.mark.parametrize("name", sorted(SETTINGS))
@pytest.mark.parametrize("family", sorted(PIPELINES))
def test_method_trains_and_resumes_on_a_flow_teacher(family, name, teachers, tmp_path):
    full, logs = _run(family, name, teachers, 2, tmp_path / "full")
    assert [s for s, _ in logs] == [1, 2]
    losses = [v for _, m in logs for k, v in m.items() if k.startswith("loss")]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses)
    base = teachers[family][0].transformer.state_dict()
    student = full.student().state_dict()
    assert any(k.removeprefix("transformer.") in base
               and not torch.equal(v, base[k.removeprefix("transformer.")])
               for k, v in student.items()), "the student did not change"
    with torch.no_grad():
        x = generate_latents(full.student(), torch.randn(2, *LATENT),
                             teachers[family][1].conditioning(torch.tensor([0, 1])), full.spec)
    assert x.shape == (2, *LATENT) and torch.isfinite(x).all()
    # a new run rebuilds everything and resumes from the step-1 checkpoint (for InstaFlow and
    # Meng et al., across their phase boundary)
    _run(family, name, teachers, 1, tmp_path / "res", total=2, checkpoint_every=1)
    resumed, logs = _run(family, name, teachers, 2, tmp_path / "res")
    assert [s for s, _ in logs] == [2]
    a, b = full.student().state_dict(), resumed.student().state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_flux_guidance_is_an_input_not_two_calls(teachers):
    """FLUX.1-dev has no true CFG: a guided prediction is one call with ``guidance = s``."""
    from components.diffusion import guided

    pipe, cache = teachers["flux"]
    net = teacher_denoiser(pipe, latent_hw=LATENT[1:])
    calls = []
    net.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs.get("guidance")),
                              with_kwargs=True)
    x, t = torch.randn(2, *LATENT), torch.tensor([500, 900])
    cond = cache.conditioning(torch.tensor([0, 1]))
    with torch.no_grad():
        a = guided(net, x, t, cond, cache.null(2), 4.5)
        b = guided(net, x, t, cond, cache.null(2), 1.0)
    assert len(calls) == 2 and calls[0].tolist() == [4.5, 4.5] and calls[1].tolist() == [1, 1]
    assert not torch.allclose(a, b)  # the guidance embedding is live


def test_methods_that_cannot_apply_fail_at_build_naming_why(teachers):
    cfg_cls, build = get_method("meng")
    flux = Teacher(teacher_denoiser(teachers["flux"][0], latent_hw=LATENT[1:]))
    with pytest.raises(ValueError, match="guidance-distilled already"):
        build(from_dict(cfg_cls, {"stage1_fraction": 0.5}, "meng"), flux, 4)
    sd3 = Teacher(teacher_denoiser(teachers["sd3"][0]))
    with pytest.raises(ValueError, match="only a guidance-distilled teacher"):
        build(from_dict(cfg_cls, {"stage1_fraction": 0.0}, "meng"), sd3, 4)
    cfg_cls, build = get_method("dmd2")
    with pytest.raises(ValueError, match="UNet's mid block"):
        build(from_dict(cfg_cls, {"gan_weight": 1e-3, "real_latents": "latents.safetensors"},
                        "dmd2"), sd3, 4)
