"""Tiny tier: SwiftBrush through the real training loop on a random-weight SD UNet."""

from __future__ import annotations

import torch

from components.diffusion import NoiseSchedule
from components.embed_cache import CacheConfig, EmbeddingCache, write_cache
from components.methods import get_method
from components.methods.swiftbrush import SwiftBrushConfig
from components.training import LoopConfig, train
from tests.tiny import tiny_pipeline

PROMPTS = ["a red circle", "a blue square", "a green triangle on the left", "a yellow circle"]


def _cache(tmp_path, pipe):
    def encode(prompts):
        ids = pipe.tokenizer(list(prompts), padding="max_length", max_length=77,
                             truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return pipe.text_encoder(ids)[0]
    write_cache(tmp_path / "cache", PROMPTS, encode, CacheConfig(shard_size=3), "tiny",
                log=lambda _: None)
    return EmbeddingCache(tmp_path / "cache")


def _run(tmp_path, pipe, cache, steps, ckpt):
    cfg = SwiftBrushConfig(student_lr=1e-3, lora_rank=4, lora_alpha=4)
    _, build = get_method("swiftbrush")
    method = build(cfg, pipe.unet, NoiseSchedule.from_scheduler(pipe.scheduler))
    logs = []
    loop = LoopConfig(steps=steps, batch_size=4, grad_accum=2, ema_decay=0.5, log_every=1,
                      sample_every=100, checkpoint_every=2)
    ema = train(method, cache, (4, 8, 8), loop, ckpt, lambda m, s: logs.append((s, m)),
                lambda module, s: None)
    return method, ema, logs


def test_swiftbrush_trains_and_changes_only_student_and_lora(tmp_path):
    pipe = tiny_pipeline()
    cache = _cache(tmp_path, pipe)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    method, _, logs = _run(tmp_path, pipe, cache, 3, tmp_path / "ck")
    assert [s for s, _ in logs] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(m["loss_vsd"])) for _, m in logs)
    student = method.student().state_dict()
    assert any(not torch.equal(student[k], before[k]) for k in before)
    # The frozen teacher's base weights never move; only its LoRA adapter trains.
    shared = dict(method.shared.named_parameters())
    for name, p in shared.items():
        if "lora" not in name:
            base = name.replace(".base_layer", "")
            assert torch.equal(p, before[base]), name


def test_resume_continues_exactly(tmp_path):
    full, _, _ = _run(tmp_path, tiny_pipeline(), _cache(tmp_path / "a", tiny_pipeline()), 4,
                      tmp_path / "full")
    _run(tmp_path, tiny_pipeline(), _cache(tmp_path / "b", tiny_pipeline()), 2, tmp_path / "res")
    # A new process would rebuild everything and resume from the step-2 checkpoint.
    resumed, _, logs = _run(tmp_path, tiny_pipeline(), _cache(tmp_path / "c", tiny_pipeline()), 4,
                            tmp_path / "res")
    assert [s for s, _ in logs] == [3, 4]
    a, b = full.student().state_dict(), resumed.student().state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
