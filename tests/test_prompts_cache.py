"""Prompt preparation and the embedding cache: pure logic, errors, and the on-disk round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from components.embed_cache import CacheConfig, CacheError, EmbeddingCache, write_cache
from components.prompts import (
    EvalCaption,
    PromptsConfig,
    PromptSource,
    PromptSourceError,
    dedupe,
    normalize,
    prepare,
    read_source,
    select_eval,
)

COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco"


def _cfg(**kw) -> PromptsConfig:
    return PromptsConfig(train_sources=(PromptSource("text", "train.txt"),),
                         eval_source=PromptSource("coco", "eval.json"), **kw)


def test_normalize_and_dedupe():
    assert normalize("  A  red\tcircle. ") == "A red circle"
    assert dedupe(["a red circle", "A red circle.", " ", "a blue square"]) == [
        "a red circle", "a blue square"]


def test_eval_captions_never_leak_into_training_prompts():
    evals = [EvalCaption("A blue square", 1, 1)]
    kept, _, manifest = prepare(["a blue square.", "a red circle", "a red circle"], evals, _cfg())
    assert kept == ["a red circle"]
    assert manifest["removed_eval_overlap"] == 1 and manifest["removed_duplicates"] == 1
    assert len(manifest["train_sha256"]) == 64


def test_select_eval_one_caption_per_image_sorted_and_capped():
    caps = [EvalCaption("b", 2, 5), EvalCaption("a", 1, 3), EvalCaption("a2", 1, 4),
            EvalCaption("c", 3, 6)]
    rows = select_eval(caps, _cfg(max_eval=2))
    assert [(r.caption, r.image_id) for r in rows] == [("a", 1), ("b", 2)]


def test_bad_prompt_files_give_clear_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "latin.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(PromptSourceError, match="is empty; it needs at least one"):
        read_source(PromptSource("text", "empty.txt"), tmp_path)
    with pytest.raises(PromptSourceError, match="not valid UTF-8.*iconv"):
        read_source(PromptSource("text", "latin.txt"), tmp_path)
    with pytest.raises(PromptSourceError, match="not found"):
        read_source(PromptSource("text", "missing.txt"), tmp_path)
    (tmp_path / "x.json").write_text(json.dumps({"images": []}))
    with pytest.raises(PromptSourceError, match="no 'annotations'"):
        read_source(PromptSource("coco", "x.json"), tmp_path)


@pytest.mark.skipif(not (COCO / "captions_val2017.json").exists(), reason="COCO captions absent")
def test_real_coco_2017_captions_give_5000_eval_captions():
    caps = read_source(PromptSource("coco", str(COCO / "captions_val2017.json")), Path("."))
    rows = select_eval(caps, _cfg(max_eval=10_000))
    assert len(caps) == 25_014 and len(rows) == 5_000
    assert len({r.image_id for r in rows}) == 5_000


def _encoder(calls: list):
    def encode(prompts):
        calls.append(list(prompts))
        return torch.stack([torch.full((3, 2), float(len(p))) for p in prompts])
    return encode


def test_cache_round_trip_and_null(tmp_path):
    prompts = ["a", "bb", "ccc", "dddd", "eeeee"]
    index = write_cache(tmp_path / "c", prompts, _encoder([]), CacheConfig(shard_size=2,
                        batch_size=1), "t", log=lambda _: None)
    assert [s["count"] for s in index["shards"]] == [2, 2, 1]
    cache = EmbeddingCache(tmp_path / "c", expected_prompts_sha256=index["prompts_sha256"])
    assert len(cache) == 5
    got = cache.conditioning(torch.tensor([4, 0])).text
    assert got[:, 0, 0].tolist() == [5.0, 1.0]
    assert cache.null(3).text.shape == (3, 3, 2) and cache.null().text.sum() == 0
    assert not (tmp_path / "c.partial").exists()
    assert cache.opened == ["shard-00000.safetensors", "shard-00002.safetensors"]


def test_fp16_cache_is_read_lazily_in_the_readers_dtype(tmp_path):
    """Stored fp16 (the default), read as the consumer's dtype; rows come only from the shards
    that hold them, and a batch is identical to the same rows of the whole table."""
    prompts = [f"p{i}" for i in range(10)]

    def encode(batch):
        return torch.stack([torch.full((3, 2), float(p[1:] or -1) + 0.1) for p in batch])
    index = write_cache(tmp_path / "c", prompts, encode, CacheConfig(shard_size=4), "t",
                        log=lambda _: None)
    assert index["dtype"] == "float16"
    from safetensors.torch import load_file
    assert load_file(str(tmp_path / "c" / "shard-00000.safetensors"))["text"].dtype == (
        torch.float16)
    cache = EmbeddingCache(tmp_path / "c")
    rows = cache.conditioning(torch.tensor([9, 8, 9]), dtype=torch.bfloat16)
    assert rows.text.dtype == torch.bfloat16 and cache.opened == ["shard-00002.safetensors"]
    want = encode(prompts).half().float()[[9, 8, 9]]
    assert torch.equal(cache.conditioning(torch.tensor([9, 8, 9])).text, want)
    assert cache.null(2, torch.float64).text.dtype == torch.float64


def test_corrupt_shard_is_detected(tmp_path):
    write_cache(tmp_path / "c", ["a", "b", "c"], _encoder([]), CacheConfig(shard_size=2), "t",
                log=lambda _: None)
    shard = tmp_path / "c" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    cache = EmbeddingCache(tmp_path / "c")  # each shard is checked once, when first read
    assert cache.conditioning(torch.tensor([0, 1])).text.shape == (2, 3, 2)
    with pytest.raises(CacheError, match="shard-00001.*corrupt.*dvc repro cache_teacher"):
        cache.conditioning(torch.tensor([2]))
    with pytest.raises(CacheError, match="built for other prompts"):
        write_cache(tmp_path / "d", ["x"], _encoder([]), CacheConfig(), "t", log=lambda _: None)
        EmbeddingCache(tmp_path / "d", expected_prompts_sha256="0" * 64)


def test_killed_cache_run_resumes_after_last_complete_shard(tmp_path):
    prompts = [f"p{i}" for i in range(6)]
    calls: list = []
    encode = _encoder(calls)

    def dies_on_third_shard(batch):
        if batch == ["p4", "p5"]:
            raise KeyboardInterrupt
        return encode(batch)

    with pytest.raises(KeyboardInterrupt):
        write_cache(tmp_path / "c", prompts, dies_on_third_shard, CacheConfig(shard_size=2),
                    "t", log=lambda _: None)
    assert not (tmp_path / "c").exists()
    calls.clear()
    write_cache(tmp_path / "c", prompts, encode, CacheConfig(shard_size=2), "t",
                log=lambda _: None)
    assert calls == [["p4", "p5"], [""]]  # shards 0 and 1 were kept, not re-encoded
    assert len(EmbeddingCache(tmp_path / "c")) == 6
