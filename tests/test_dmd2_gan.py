"""DMD2's GAN term (tiny tier): real latents with their own captions, the official
discriminator head, and stage 2 starting from a stage-1 checkpoint."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from components.batches import PromptBatches
from components.config import from_dict
from components.embed_cache import CacheConfig, EmbeddingCache, write_cache
from components.generation import encode_prompts
from components.methods import Teacher, get_method
from components.real_latents import (
    RealLatents,
    RealLatentsError,
    load_real_latents,
    save_real_latents,
)
from components.teacher import TextConditioning, teacher_denoiser
from components.training import LoopConfig, checkpoint_weights, save_checkpoint, train
from tests.tiny import tiny_pipeline

PROMPTS = ["a red circle", "a blue square", "a green triangle on the left", "a yellow circle"]
SETTINGS = {"generator_lr": 1e-3, "fake_lr": 1e-3, "gen_update_ratio": 2, "warmup_steps": 2}


def _cache(tmp_path, pipe) -> EmbeddingCache:
    write_cache(tmp_path / "cache", PROMPTS, lambda p: encode_prompts(pipe, p).text,
                CacheConfig(shard_size=3), "tiny", log=lambda _: None)
    return EmbeddingCache(tmp_path / "cache")


def _real_file(path, n=6, latent=(4, 8, 8), width=32):
    """Real latents whose caption embeddings are recognisable: row i is the constant 10 + i."""
    text = (10.0 + torch.arange(n, dtype=torch.float32)).view(n, 1, 1).expand(n, 77, width)
    save_real_latents(path, RealLatents(torch.randn(n, *latent), TextConditioning(text),
                                        [f"caption {i}" for i in range(n)]))
    return str(path)


def _build(pipe, **settings):
    cfg_cls, build = get_method("dmd2")
    return build(from_dict(cfg_cls, {**SETTINGS, **settings}, "dmd2"),
                 Teacher(teacher_denoiser(pipe)), 4)


def _signature(head: torch.nn.Module) -> list[tuple]:
    def one(m):
        if isinstance(m, torch.nn.Conv2d):
            return ("conv", m.kernel_size[0], m.stride[0], m.padding[0], m.out_channels)
        if isinstance(m, torch.nn.GroupNorm):
            return ("gn", m.num_groups)
        return (type(m).__name__,)
    return [one(m) for m in head.children()]


def test_real_branch_is_conditioned_on_each_real_images_own_caption(tmp_path):
    """D sees a generated sample with its prompt and a real image with its own caption, never
    a real image with the generator batch's prompts (text alignment would give it away)."""
    pipe = tiny_pipeline()
    batches = PromptBatches.from_cache(_cache(tmp_path, pipe), (4, 8, 8))
    method = _build(pipe, gan_weight=1e-3, real_latents=_real_file(tmp_path / "real.st"))
    seen = []
    method.mu_fake.unet.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["encoder_hidden_states"].detach()), with_kwargs=True)
    batch = batches(4, torch.Generator().manual_seed(0))
    method.loss("fake", batch, {})
    # calls: fake-score ε-MSE, D on generated samples, D on real latents
    assert len(seen) == 3
    torch.testing.assert_close(seen[1], batch.cond.text)
    real_rows = seen[2][:, 0, 0].tolist()
    assert all(r in [10.0 + i for i in range(6)] for r in real_rows), real_rows
    assert torch.equal(seen[2], seen[2][:, :1, :1].expand_as(seen[2]))  # whole rows, own caption


def test_real_latents_without_captions_are_refused_with_one_clear_error(tmp_path):
    save_file({"latents": torch.randn(3, 4, 8, 8)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(RealLatentsError, match=r"lacks text.*own caption.*pipeline.real_latents"):
        load_real_latents(tmp_path / "bare.safetensors")
    with pytest.raises(RealLatentsError, match="lacks text"):
        _build(tiny_pipeline(), gan_weight=1e-3, real_latents=str(tmp_path / "bare.safetensors"))
    # captions encoded for another teacher (SDXL width) are refused before training
    other = _real_file(tmp_path / "other.st", width=2048)
    with pytest.raises(ValueError, match="re-encode it with this teacher"):
        _build(tiny_pipeline(), gan_weight=1e-3, real_latents=other)


def test_discriminator_head_is_the_official_architecture(tmp_path):
    """SD1.5's 8×8 bottleneck: conv4/s2/p1 → GN(32) → SiLU → conv4/s4/p0 → GN(32) → SiLU →
    conv1×1 (DMD2 main/sd_guidance.py). The tiny UNet halves once: 16×16 latents → 8×8."""
    from components.methods.dmd2 import DiscriminatorHead

    pipe = tiny_pipeline(latent_size=16)
    method = _build(pipe, gan_weight=1e-3,
                    real_latents=_real_file(tmp_path / "real.st", latent=(4, 16, 16)))
    c = pipe.unet.config.block_out_channels[-1]
    stage = [("gn", 32), ("SiLU",)]
    assert _signature(method.head) == [("conv", 4, 2, 1, c), *stage, ("conv", 4, 4, 0, c),
                                       *stage, ("conv", 1, 1, 0, 1)]
    assert method.head(torch.randn(3, c, 8, 8)).shape == (3,)
    # SDXL's 32×32 bottleneck: three halving stages first (its official head)
    sdxl = DiscriminatorHead(64, 32)
    assert _signature(sdxl) == [("conv", 4, 2, 1, 64), *stage] * 3 + [
        ("conv", 4, 4, 0, 64), *stage, ("conv", 1, 1, 0, 1)]
    assert sdxl(torch.randn(2, 64, 32, 32)).shape == (2,)
    # under 4×4 (the tiny default 4×4, the world's 2×2): the last conv covers the whole map
    assert _signature(DiscriminatorHead(32, 4))[0] == ("conv", 4, 4, 0, 32)
    assert _signature(DiscriminatorHead(32, 2))[0] == ("conv", 2, 2, 0, 32)
    with pytest.raises(ValueError, match=r"2\^k.*6×6"):
        DiscriminatorHead(32, 6)
    with pytest.raises(ValueError, match="multiple of 32"):
        DiscriminatorHead(48, 8)
    with pytest.raises(ValueError, match="real latents' 8×8"):
        method.head(torch.randn(1, c, 4, 4))


def _stage1(tmp_path, pipe, cache):
    method = _build(pipe)
    train(method, PromptBatches.from_cache(cache, (4, 8, 8)),
          LoopConfig(steps=2, batch_size=2, log_every=1, sample_every=100, checkpoint_every=2),
          tmp_path / "stage1", lambda m, s: None, lambda module, s: None)
    return tmp_path / "stage1"


def test_stage_two_starts_from_the_stage_one_weights(tmp_path):
    """``init_from``: generator and fake score from the stage-1 checkpoint, D fresh, the
    published stage-2 learning rate, and then the GAN term trains."""
    pipe = tiny_pipeline()
    cache = _cache(tmp_path, pipe)
    ckpt = _stage1(tmp_path, pipe, cache)
    saved = {n: checkpoint_weights(ckpt / "step-0000002", n) for n in ("generator", "fake")}
    stage2 = _build(pipe, gan_weight=1e-3, gan_head_weight=1e-2, generator_lr=5e-7,
                    fake_lr=5e-7, real_latents=_real_file(tmp_path / "real.st"),
                    init_from=str(ckpt))
    teacher = teacher_denoiser(pipe).state_dict()
    for name, module in (("generator", stage2.G_theta), ("fake", stage2.mu_fake)):
        state = module.state_dict()
        assert all(torch.equal(state[k], v) for k, v in saved[name].items()), name
        assert any(not torch.equal(state[k], teacher[k]) for k in saved[name]), name
    assert stage2.make_optimizer("generator").param_groups[0]["lr"] == 5e-7
    logs = []
    train(stage2, PromptBatches.from_cache(cache, (4, 8, 8)),
          LoopConfig(steps=2, batch_size=2, log_every=1, sample_every=100, checkpoint_every=2),
          tmp_path / "stage2", lambda m, s: logs.append(m), lambda module, s: None)
    assert all("loss_gan_d" in m for m in logs)
    # a stage-2 checkpoint holds D too, and a run started from it takes D along
    again = _build(pipe, gan_weight=1e-3, real_latents=_real_file(tmp_path / "real.st"),
                   init_from=str(tmp_path / "stage2" / "step-0000002"))
    head = checkpoint_weights(tmp_path / "stage2" / "step-0000002", "gan_head")
    assert all(torch.equal(again.head.state_dict()[k], v) for k, v in head.items())


def test_stage_two_refuses_a_folder_that_is_not_a_dmd2_checkpoint(tmp_path):
    pipe = tiny_pipeline()
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        _build(pipe, init_from=str(tmp_path))
    only_generator = SimpleNamespace(state_modules=lambda: {"generator": _build(pipe).G_theta})
    save_checkpoint(tmp_path / "ck", only_generator, {}, SimpleNamespace(shadow={}), 1)
    with pytest.raises(FileNotFoundError, match="holds no 'fake' weights"):
        _build(pipe, init_from=str(tmp_path / "ck"))


def _image_folder(folder, sizes):
    folder.mkdir()
    rng = np.random.default_rng(0)
    captions = {}
    for i, (w, h) in enumerate(sizes):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        captions[f"img{i}.png"] = PROMPTS[i]
    (folder / "captions.json").write_text(json.dumps(captions))
    return captions


def test_real_latents_command_encodes_images_with_their_own_captions(tmp_path):
    """``python -m pipeline.real_latents`` on a tiny teacher: each image (any size, resized and
    cropped to the teacher's 16×16) becomes a VAE latent stored beside its caption's embedding."""
    from pipeline.real_latents import main

    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "teacher", safe_serialization=True)
    captions = _image_folder(tmp_path / "images", [(16, 16), (40, 24), (20, 32)])
    out = tmp_path / "real.safetensors"
    main(["--teacher", str(tmp_path / "teacher"), "--images", str(tmp_path / "images"),
          "--out", str(out), "--batch-size", "2"])
    real = load_real_latents(out)
    names = sorted(captions)
    assert real.latents.shape == (3, 4, 8, 8) and torch.isfinite(real.latents).all()
    assert real.captions == [captions[n] for n in names]
    torch.testing.assert_close(real.cond.text, encode_prompts(pipe, real.captions).text)
    # the latent is a posterior sample of the VAE at the image's pixels, times the scale
    pixels = torch.from_numpy(np.asarray(Image.open(tmp_path / "images" / names[0]),
                                         dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    with torch.no_grad():
        dist = pipe.vae.encode(pixels[None]).latent_dist
    z = real.latents[0] / pipe.vae.config.scaling_factor
    assert ((z - dist.mean[0]).abs() <= 6 * dist.std[0]).all()
    assert not torch.equal(z, dist.mean[0])
    # and DMD2's GAN term trains on it
    method = _build(pipe, gan_weight=1e-3, real_latents=str(out))
    loss, metrics = method.loss("fake", PromptBatches.from_cache(
        _cache(tmp_path, pipe), (4, 8, 8))(2, torch.Generator().manual_seed(0)), {})
    assert torch.isfinite(loss).all() and "loss_gan_d" in metrics


def test_sdxl_real_latents_carry_pooled_embeddings_and_each_images_size(tmp_path):
    """SDXL: the real branch gets each image's pooled embedding and its own micro-conditioning
    (original size, crop top-left, target size), as SDXL was trained."""
    from components.real_latents import encode_images
    from tests.tiny import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    _image_folder(tmp_path / "images", [(40, 24), (16, 16)])
    files = [tmp_path / "images" / f"img{i}.png" for i in range(2)]
    real = encode_images(pipe, files, PROMPTS[:2], (8, 8))
    assert real.cond.pooled.shape == (2, 32)
    # 40×24 → scaled to 27×16 (shorter side 16), centre crop 16×16 from left 5
    assert real.cond.time_ids.tolist() == [[24, 40, 0, 5, 16, 16], [16, 16, 0, 0, 16, 16]]
    save_real_latents(tmp_path / "real.st", real)
    # the generator batches: cached SDXL text, pooled embeddings and time ids
    write_cache(tmp_path / "cache", PROMPTS, lambda p: encode_prompts(pipe, p),
                CacheConfig(shard_size=3), "tiny", log=lambda _: None)
    batches = PromptBatches.from_cache(EmbeddingCache(tmp_path / "cache"), (4, 8, 8))
    method = _build(pipe, gan_weight=1e-3, real_latents=str(tmp_path / "real.st"))
    seen = []
    method.mu_fake.unet.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["added_cond_kwargs"]["time_ids"]), with_kwargs=True)
    loss, _ = method.loss("fake", batches(2, torch.Generator().manual_seed(0)), {})
    assert torch.isfinite(loss).all()
    assert all(row in real.cond.time_ids.tolist() for row in seen[-1].tolist())
