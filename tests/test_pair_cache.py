"""The teacher pair cache: round trip, exact noise from seeds, resume after a kill, corruption."""

from __future__ import annotations

import pytest
import torch

from components.generation import seeded_noise
from components.io import CacheError
from components.pair_cache import PairCache, PairsConfig, pair_prompts, write_pairs

SHAPE = (4, 2, 2)


def sampler(calls: list):
    def sample(prompt_ids, z):
        calls.append(len(prompt_ids))
        return z * 2 + prompt_ids.view(-1, 1, 1, 1).float()  # a stand-in "teacher ODE"
    return sample


def test_round_trip_regenerates_the_exact_noise(tmp_path):
    cfg = PairsConfig(count=10, batch_size=3, shard_size=4, seed=7)
    index = write_pairs(tmp_path / "pairs", sampler([]), 5, SHAPE, cfg,
                        {"prompts_sha256": "abc", "teacher": "t"}, log=lambda _: None)
    assert [s["count"] for s in index["shards"]] == [4, 4, 2]
    cache = PairCache(tmp_path / "pairs", expected_prompts_sha256="abc")
    assert len(cache) == 10
    every = torch.arange(10)
    torch.testing.assert_close(cache.prompts(every), pair_prompts(cfg, 5))
    z = cache.noise(every)
    torch.testing.assert_close(z, seeded_noise(range(7, 17), SHAPE))
    torch.testing.assert_close(cache.samples(every),
                               z * 2 + cache.prompts(every).view(-1, 1, 1, 1).float())
    lazy = PairCache(tmp_path / "pairs")
    torch.testing.assert_close(lazy.samples(torch.tensor([9, 8])), cache.samples(every)[[9, 8]])
    assert lazy.opened == ["pairs-00002.safetensors"]  # only the shard holding rows 8 and 9


def test_a_killed_run_resumes_after_its_last_complete_shard(tmp_path):
    cfg = PairsConfig(count=10, batch_size=4, shard_size=4)
    calls: list = []

    def dying(prompt_ids, z):
        if len(calls) == 2:  # killed while sampling the third shard
            raise KeyboardInterrupt
        return sampler(calls)(prompt_ids, z)
    with pytest.raises(KeyboardInterrupt):
        write_pairs(tmp_path / "pairs", dying, 5, SHAPE, cfg, {}, log=lambda _: None)
    assert not (tmp_path / "pairs").exists() and (tmp_path / "pairs.partial").exists()
    calls.clear()
    write_pairs(tmp_path / "pairs", sampler(calls), 5, SHAPE, cfg, {}, log=lambda _: None)
    assert calls == [2]  # shards 0 and 1 were kept; only shard 2 is sampled now
    full = tmp_path / "full"
    write_pairs(full, sampler([]), 5, SHAPE, cfg, {}, log=lambda _: None)
    every = torch.arange(10)
    torch.testing.assert_close(PairCache(tmp_path / "pairs").samples(every),
                               PairCache(full).samples(every))


def test_corrupt_or_stale_caches_fail_with_the_fix(tmp_path):
    cfg = PairsConfig(count=4, shard_size=2)
    write_pairs(tmp_path / "pairs", sampler([]), 3, SHAPE, cfg, {"prompts_sha256": "abc"},
                log=lambda _: None)
    with pytest.raises(CacheError, match="other prompts"):
        PairCache(tmp_path / "pairs", expected_prompts_sha256="xyz")
    shard = tmp_path / "pairs" / "pairs-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3] + b"abc")
    cache = PairCache(tmp_path / "pairs")  # shards are checked when first read
    cache.samples(torch.tensor([0, 1]))
    with pytest.raises(CacheError, match="pairs-00001.*corrupt.*dvc repro cache_teacher"):
        cache.samples(torch.tensor([3]))
    with pytest.raises(CacheError, match="cache.pairs.count"):
        PairCache(tmp_path / "missing")
