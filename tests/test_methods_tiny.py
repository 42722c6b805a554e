"""Tiny tier: every method through the real training loop on a random-weight SD pipeline."""

from __future__ import annotations

import pytest
import torch

from components.batches import PairBatches, PromptBatches
from components.config import from_dict
from components.embed_cache import CacheConfig, EmbeddingCache, write_cache
from components.generation import generate_latents
from components.methods import Batch, Teacher, get_method, method_names
from components.teacher import teacher_denoiser
from components.training import LoopConfig, checkpoint_weights, train
from tests.memory_pairs import MemoryPairs
from tests.tiny import tiny_pipeline

PROMPTS = ["a red circle", "a blue square", "a green triangle on the left", "a yellow circle"]
LATENT = (4, 8, 8)

# Small settings so a few steps move the weights visibly; everything else is the published default.
SETTINGS = {
    "swiftbrush": {"student_lr": 1e-3, "lora_rank": 4, "lora_alpha": 4},
    "dmd2": {"generator_lr": 1e-3, "fake_lr": 1e-3, "gen_update_ratio": 2, "warmup_steps": 2},
    "sid_lsg": {"generator_lr": 1e-3, "fake_lr": 1e-3},
    "instaflow": {"lr": 1e-3, "reflow_fraction": 0.5, "distill_ode_steps": 2,
                  "lpips_fraction": 0.0, "warmup_steps": 0},
    "meng": {"lr": 1e-3, "w_dim": 8, "stage1_fraction": 0.25, "start_steps": 4,
             "final_steps": 1},
}


def _cache(tmp_path, pipe) -> EmbeddingCache:
    def encode(prompts):
        ids = pipe.tokenizer(list(prompts), padding="max_length", max_length=77,
                             truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return pipe.text_encoder(ids)[0]
    write_cache(tmp_path / "cache", PROMPTS, encode, CacheConfig(shard_size=3), "tiny",
                log=lambda _: None)
    return EmbeddingCache(tmp_path / "cache")


def _run(name, tmp_path, steps, ckpt, total=None, overrides=None):
    pipe = tiny_pipeline()
    cache = _cache(tmp_path, pipe)
    cfg_cls, build = get_method(name)
    method = build(from_dict(cfg_cls, {**SETTINGS[name], **(overrides or {})}, name),
                   Teacher(teacher_denoiser(pipe)), total or steps)
    if method.needs_pairs:
        batches = PairBatches(cache, cache.null(1), MemoryPairs(teacher_denoiser(pipe), cache, LATENT), LATENT)
    else:
        batches = PromptBatches.from_cache(cache, LATENT)
    logs = []
    loop = LoopConfig(steps=steps, batch_size=4, grad_accum=2, log_every=1,
                      sample_every=100, checkpoint_every=2)
    ema = train(method, batches, loop, ckpt, lambda m, s: logs.append((s, m)),
                lambda module, s: None)
    return pipe, cache, method, ema, logs


def test_every_method_is_tested_here():
    assert sorted(SETTINGS) == method_names()


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_method_trains_and_its_student_generates(name, tmp_path):
    _, cache, method, _, logs = _run(name, tmp_path, 4, tmp_path / "ck")
    assert [s for s, _ in logs] == [1, 2, 3, 4]
    losses = [v for _, m in logs for k, v in m.items() if k.startswith("loss")]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses)
    teacher = tiny_pipeline().unet.state_dict()
    student = method.student().state_dict()
    moved = [k for k in student if k.removeprefix("unet.") in teacher
             and not torch.equal(student[k], teacher[k.removeprefix("unet.")])]
    assert moved, "the student did not change"
    with torch.no_grad():
        x = generate_latents(method.student(), torch.randn(2, *LATENT),
                             cache.conditioning(torch.tensor([0, 1])), method.spec)
    assert x.shape == (2, *LATENT) and torch.isfinite(x).all()


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_resume_continues_exactly(name, tmp_path):
    full = _run(name, tmp_path / "a", 4, tmp_path / "full")[2]
    _run(name, tmp_path / "b", 2, tmp_path / "res", total=4)
    # A new process rebuilds everything and resumes from the step-2 checkpoint.
    _, _, resumed, _, logs = _run(name, tmp_path / "c", 4, tmp_path / "res")
    assert [s for s, _ in logs] == [3, 4]
    a, b = full.student().state_dict(), resumed.student().state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_four_step_student_trains_resumes_exactly_and_samples_in_four_steps(tmp_path):
    """DMD2's four-step generator with backward simulation (iterations 1 and 3 train steps
    k = 1 and 2: the student's own earlier steps feed the generator), resumed from step 2."""
    from components.few_step import simulated_step
    from components.generation import SeededNoise

    assert [simulated_step(i, 4) for i in range(4)] == [0, 1, 0, 2]  # torch's generator, pinned
    four = {"generator_steps": 4, "gen_update_ratio": 1}
    _, cache, full, _, logs = _run("dmd2", tmp_path / "a", 4, tmp_path / "full", overrides=four)
    assert full.spec.steps == 4 and all(torch.isfinite(torch.tensor(m["loss_fake"]))
                                        for _, m in logs)
    _run("dmd2", tmp_path / "b", 2, tmp_path / "res", total=4, overrides=four)
    _, _, resumed, _, logs = _run("dmd2", tmp_path / "c", 4, tmp_path / "res", overrides=four)
    assert [s for s, _ in logs] == [3, 4]
    a, b = full.student().state_dict(), resumed.student().state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    noise = SeededNoise([0, 1])
    with torch.no_grad():
        x = generate_latents(full.student(), noise(LATENT), cache.conditioning(torch.tensor([0, 1])),
                             full.spec, noise.like)
    assert x.shape == (2, *LATENT) and torch.isfinite(x).all()


def test_swiftbrush_trains_only_student_and_lora(tmp_path):
    before = {k: v.clone() for k, v in tiny_pipeline().unet.state_dict().items()}
    _, _, method, _, _ = _run("swiftbrush", tmp_path, 3, tmp_path / "ck")
    # The frozen teacher's base weights never move; only its LoRA adapter trains.
    for name, p in method.shared.named_parameters():
        if "lora" not in name:
            base = name.removeprefix("unet.").replace(".base_layer", "")
            assert torch.equal(p, before[base]), name


def test_dmd2_updates_the_generator_every_nth_iteration(tmp_path):
    *_, logs = _run("dmd2", tmp_path, 4, tmp_path / "ck")
    gen_steps = [s for s, m in logs if "loss_dm" in m]
    fake_steps = [s for s, m in logs if "loss_fake" in m]
    assert gen_steps == [1, 3] and fake_steps == [1, 2, 3, 4]  # ratio 2: iterations 0 and 2


def test_vsd_gradient_equals_sigma2_weighted_score_difference(tmp_path):
    """∂L_G/∂θ must equal the gradient of <x̂_0, g>/N with g = σ_t²(ε̂_φ − ε̂_ψ) (paper Eq. 6)."""
    from components.generation import one_step_x0
    from components.methods.swiftbrush import SwiftBrushConfig

    pipe = tiny_pipeline()
    cache = _cache(tmp_path, pipe)
    cfg = SwiftBrushConfig(lora_rank=4, lora_alpha=4, guidance_scale=2.0)
    _, build = get_method("swiftbrush")
    method = build(cfg, Teacher(teacher_denoiser(pipe)), 1)
    # Make the LoRA teacher differ from the teacher so g is not zero.
    for name, p in method.shared.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    z = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(1))

    def batch(seed):
        return Batch(cache.conditioning(torch.tensor([0, 1])), cache.null(2), z,
                     torch.Generator().manual_seed(seed))

    student = method.student()
    per_sample, _ = method.generator_loss(batch(7), {})
    per_sample.mean().backward()
    got = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()

    b = batch(7)
    x0 = one_step_x0(method.f_theta, b.z, b.cond, method.spec)
    t = torch.randint(cfg.t_min, cfg.t_max + 1, (2,), generator=b.generator)
    eps = torch.randn(x0.shape, generator=b.generator)
    alpha, sigma = method.schedule.alpha_sigma(t, x0)
    with torch.no_grad():
        x_t = alpha * x0 + sigma * eps
        g = sigma**2 * (method._guided(x_t, t, b, False) - method._guided(x_t, t, b, True))
    assert g.abs().max() > 1e-4
    ((x0 * g).sum() / x0.numel()).backward()
    # The surrogate forms g as x̂_0 − (x̂_0 − g) in fp32, losing about |x̂_0|/|g| · 6e-8 of g:
    # agreement to 1e-3 relative / 1e-6 absolute is what float32 allows, far below any real error.
    for a, e in zip(got, (p.grad for p in student.parameters())):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-6)


def test_sdxl_conditioning_through_cache_and_method(tmp_path):
    """SDXL: pooled embeddings and time ids go through the cache, the empty prompt is zeros,
    and a method trains on them (the adapter passes SDXL's added conditioning)."""
    from components.generation import encode_prompts, unconditional
    from tests.tiny import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    write_cache(tmp_path / "cache", PROMPTS, lambda b: encode_prompts(pipe, b),
                CacheConfig(shard_size=3), "tiny-sdxl", log=lambda _: None,
                null=unconditional(pipe))
    cache = EmbeddingCache(tmp_path / "cache")
    table = cache.conditioning(torch.arange(len(cache)))
    assert table.text.shape == (4, 77, 64) and table.pooled.shape == (4, 32)
    assert table.time_ids[0].tolist() == [16, 16, 0, 0, 16, 16]  # 8 latents × VAE factor 2
    assert cache.null(1).text.abs().sum() == 0 and cache.null(1).pooled.abs().sum() == 0
    cfg_cls, build = get_method("dmd2")
    method = build(from_dict(cfg_cls, SETTINGS["dmd2"], "dmd2"),
                   Teacher(teacher_denoiser(pipe)), 2)
    logs = []
    train(method, PromptBatches.from_cache(cache, LATENT),
          LoopConfig(steps=2, batch_size=4, grad_accum=2, log_every=1, sample_every=100,
                     checkpoint_every=100), tmp_path / "ck", lambda m, s: logs.append(m),
          lambda module, s: None)
    assert "loss_dm" in logs[0] and torch.isfinite(torch.tensor(logs[0]["loss_dm"]))


def test_instaflow_lpips_without_backbone_weights_stops_and_names_them(tmp_path, monkeypatch):
    """Offline, LPIPS's ImageNet backbone cannot be fetched: the run stops before training and
    says which file to supply (or how to run without LPIPS), never a silent substitute."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached weights here
    cfg_cls, build = get_method("instaflow")
    pipe = tiny_pipeline()
    from components.methods.instaflow import LpipsUnavailable

    with pytest.raises(LpipsUnavailable, match=r"alexnet.*hub/checkpoints.*lpips_fraction: 0"):
        build(cfg_cls(lpips_fraction=0.5), Teacher(teacher_denoiser(pipe), lambda x: x), 10)


@pytest.mark.parametrize("name", ["dmd2", "sid_lsg"])
def test_v_prediction_teacher(name, tmp_path):
    """A v-prediction teacher (SD2.1-768 style) is read through the same conversions."""
    pipe = tiny_pipeline()
    pipe.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config,
                                                          prediction_type="v_prediction")
    cache = _cache(tmp_path, pipe)
    teacher = teacher_denoiser(pipe)
    assert teacher.prediction_type == "v_prediction"
    cfg_cls, build = get_method(name)
    method = build(from_dict(cfg_cls, SETTINGS[name], name), Teacher(teacher), 2)
    logs = []
    train(method, PromptBatches.from_cache(cache, LATENT),
          LoopConfig(steps=2, batch_size=2, log_every=1, sample_every=100,
                     checkpoint_every=100), tmp_path / "ck", lambda m, s: logs.append(m),
          lambda module, s: None)
    assert all(torch.isfinite(torch.tensor(v)) for m in logs for k, v in m.items()
               if k.startswith("loss"))


def test_dmd2_gan_term_needs_real_latents_and_trains_a_head(tmp_path):
    """The GAN term is optional and only runs on supplied real latents; its head trains with
    the fake score and its generator loss reaches the generator."""
    from safetensors.torch import save_file

    cfg_cls, build = get_method("dmd2")
    with pytest.raises(Exception, match="real_latents"):
        from_dict(cfg_cls, {"gan_weight": 1e-3}, "dmd2")
    # real latents with their captions' embeddings (components/real_latents.py's format)
    save_file({"latents": torch.randn(6, *LATENT), "text": torch.randn(6, 77, 32)},
              str(tmp_path / "real.safetensors"))
    settings = {**SETTINGS["dmd2"], "gan_weight": 1e-3,
                "real_latents": str(tmp_path / "real.safetensors")}
    pipe = tiny_pipeline()
    cache = _cache(tmp_path, pipe)
    method = build(from_dict(cfg_cls, settings, "dmd2"), Teacher(teacher_denoiser(pipe)), 4)
    head_before = [p.clone() for p in method.head.parameters()]
    logs = []
    train(method, PromptBatches.from_cache(cache, LATENT),
          LoopConfig(steps=4, batch_size=4, log_every=1, sample_every=100, checkpoint_every=2),
          tmp_path / "ck", lambda m, s: logs.append(m), lambda module, s: None)
    assert any("loss_gan_g" in m for m in logs) and all("loss_gan_d" in m for m in logs)
    assert any(not torch.equal(a, b) for a, b in zip(head_before, method.head.parameters()))
    assert checkpoint_weights(tmp_path / "ck" / "step-0000004", "gan_head")
