"""Sharded caches read lazily: batches equal the whole table's rows, only the shards holding a
batch's rows are opened, and a process reading batches never holds the table in memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from components.batches import PairBatches, PromptBatches
from components.embed_cache import CacheConfig, EmbeddingCache, write_cache
from components.pair_cache import PairCache, PairsConfig, write_pairs
from components.shards import ShardedTable
from components.teacher import TextConditioning
from components.training import step_generator

ROOT = Path(__file__).resolve().parents[1]


def _encode(batch):  # a deterministic stand-in for a text encoder: (B, 5, 3)
    vals = torch.tensor([float(sum(map(ord, p))) for p in batch])
    return vals.view(-1, 1, 1) * torch.linspace(0.5, 1.5, 15).view(1, 5, 3) / 100


def test_batch_k_is_the_same_from_the_lazy_cache_as_from_the_whole_table(tmp_path):
    prompts = [f"prompt {i}" for i in range(23)]
    write_cache(tmp_path / "c", prompts, _encode, CacheConfig(shard_size=5, dtype="float32"),
                "t", log=lambda _: None)
    cache = EmbeddingCache(tmp_path / "c")
    table = TextConditioning(_encode(prompts))  # what the cache used to load whole
    lazy = PromptBatches.from_cache(cache, (4, 2, 2))
    whole = PromptBatches(table, cache.null(1), (4, 2, 2))
    for step in range(4):
        a, b = lazy(6, step_generator(0, step), step), whole(6, step_generator(0, step), step)
        assert torch.equal(a.cond.text, b.cond.text) and torch.equal(a.z, b.z)
    write_pairs(tmp_path / "p", lambda ids, z, _scale: z + ids.view(-1, 1, 1, 1), len(prompts),
                (4, 2, 2), PairsConfig(count=12, shard_size=5, batch_size=4), {},
                log=lambda _: None)
    pairs = PairCache(tmp_path / "p")
    batch = PairBatches(cache, cache.null(1), pairs, (4, 2, 2))(4, step_generator(0, 3), 3)
    idx = torch.randint(0, 12, (4,), generator=step_generator(0, 3))
    ids = pairs.prompts(idx)
    assert torch.equal(batch.cond.text, table.text[ids])
    assert torch.equal(batch.x1, pairs.noise(idx) + ids.view(-1, 1, 1, 1))


def test_only_the_shards_of_the_requested_rows_are_opened(tmp_path):
    write_cache(tmp_path / "c", [f"p{i}" for i in range(40)], _encode, CacheConfig(shard_size=8),
                "t", log=lambda _: None)
    cache = EmbeddingCache(tmp_path / "c")
    assert cache.opened == []  # opening a cache reads no shard
    cache.conditioning(torch.tensor([17, 9, 23]))
    assert cache.opened == ["shard-00001.safetensors", "shard-00002.safetensors"]
    table = ShardedTable(tmp_path / "c", cache.index["shards"], "cache shard")
    assert table.rows("text", []).shape == (0, 5, 3) and len(table) == 40


def test_each_shard_is_hash_checked_once(tmp_path, monkeypatch):
    from components import shards

    write_cache(tmp_path / "c", [f"p{i}" for i in range(12)], _encode, CacheConfig(shard_size=4),
                "t", log=lambda _: None)
    cache = EmbeddingCache(tmp_path / "c")
    checked: list = []
    real = shards.verify
    monkeypatch.setattr(shards, "verify", lambda f, e, w: checked.append(e["file"]) or real(f, e, w))
    for _ in range(3):
        cache.conditioning(torch.tensor([0, 5]))
    assert checked == ["shard-00000.safetensors", "shard-00001.safetensors"]
    cache.verify()
    cache.conditioning(torch.tensor([11, 1]))
    assert checked == [f"shard-0000{k}.safetensors" for k in range(3)]


READER = """
import json, re, sys, torch
from components.batches import PromptBatches
from components.embed_cache import EmbeddingCache
from components.training import step_generator

def anon_kib():  # memory this process allocated (mapped shard pages are file-backed, not this)
    return int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1))

before = anon_kib()
cache = EmbeddingCache(sys.argv[1])
batches = PromptBatches.from_cache(cache, (4, 8, 8))
grown = 0
for step in range(5):
    batch = batches(16, step_generator(0, step), step)
    grown = max(grown, anon_kib() - before)
print(json.dumps({"grown_kib": grown, "opened": len(cache.opened)}))
"""


def test_reading_batches_never_allocates_the_table(tmp_path):
    """A 120 MiB fp16 cache (240 MiB as fp32, the old loader's copy): a fresh process drawing
    five batches of 16 grows its allocated (anonymous) memory by less than an eighth of the
    table. Linux only (/proc/self/status)."""
    rows, length, width = 2048, 77, 384

    def encode(batch):
        return torch.randn(len(batch), length, width)
    write_cache(tmp_path / "c", [f"p{i}" for i in range(rows)], encode,
                CacheConfig(shard_size=256, batch_size=256), "t", log=lambda _: None)
    table_kib = rows * length * width * 2 // 1024
    out = subprocess.run([sys.executable, "-c", READER, str(tmp_path / "c")], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=300)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["grown_kib"] < table_kib / 8, (got, table_kib)
    assert 1 <= got["opened"] <= 8
