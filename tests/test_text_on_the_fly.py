"""``cache.text_embeddings: on_the_fly``: the prompts are encoded in each batch instead of once
into shards. A batch is the same in both modes on every teacher family, up to one rounding step of
the storage dtype (the rows go through it either way; a text encoder's kernels sum in an order
that depends on how many prompts they are given, so a batch of other size may round a value the
other way), and on the micro world the distill stage trains the same student from an on-the-fly
cache as from a disk one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from components.batches import PromptBatches
from components.config import ConfigError
from components.embed_cache import (
    CacheConfig,
    CacheError,
    EmbeddingCache,
    PromptEncoder,
    open_embeddings,
    write_cache,
)
from components.generation import encode_prompts, unconditional
from components.teacher import TextConditioning
from pipeline import paths
from pipeline.params import load_all
from pipeline.stages import cache_teacher, distill
from tests.projects import prepared_project
from tests.threads import one_thread  # noqa: F401
from tests.tiny import tiny_pipeline, tiny_sdxl_pipeline
from tests.tiny_flow import tiny_flux_pipeline, tiny_sd3_pipeline

PROMPTS = [f"a {c} {s}" for c in ("red", "green", "blue", "gray") for s in ("circle", "square")]
FAMILIES = {"sd15": tiny_pipeline, "sdxl": tiny_sdxl_pipeline,
            "sd3": lambda: tiny_sd3_pipeline(t5=True), "flux": tiny_flux_pipeline}


def _fields(cond: TextConditioning) -> list[torch.Tensor | None]:
    return [cond.text, cond.pooled, cond.time_ids]


FP16_STEP = 2.0**-10  # one rounding step of float16, relative


def _assert_same(a: TextConditioning, b: TextConditioning) -> None:
    for x, y in zip(_fields(a), _fields(b)):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=FP16_STEP, atol=2.0**-14)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_on_the_fly_batches_equal_the_disk_caches(family, tmp_path):
    pipe = FAMILIES[family]()
    for name in distill.TEXT_ENCODERS:  # as from_pretrained leaves them (no dropout)
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).eval()

    def encode(batch):
        return encode_prompts(pipe, batch)

    with torch.no_grad():
        for mode in ("disk", "on_the_fly"):
            cfg = CacheConfig(text_embeddings=mode, shard_size=3, batch_size=4, dtype="float16")
            index = write_cache(tmp_path / mode, PROMPTS, encode, cfg, family, log=lambda m: None,
                                null=unconditional(pipe))
            assert index["count"] == len(PROMPTS) and index["text_embeddings"] == mode
    assert not list((tmp_path / "on_the_fly").glob("shard-*"))  # nothing but index and null
    disk = open_embeddings(tmp_path / "disk")
    fly = open_embeddings(tmp_path / "on_the_fly", encoder=lambda: (PROMPTS, encode))
    assert isinstance(disk, EmbeddingCache) and isinstance(fly, PromptEncoder)
    assert len(fly) == len(disk) == len(PROMPTS)
    _assert_same(fly.null(2), disk.null(2))
    shape = (4, 8, 8)
    for step in range(3):
        a = PromptBatches.from_cache(disk, shape)(5, torch.Generator().manual_seed(step))
        b = PromptBatches.from_cache(fly, shape)(5, torch.Generator().manual_seed(step))
        _assert_same(a.cond, b.cond)
        _assert_same(a.uncond, b.uncond)
        assert torch.equal(a.z, b.z)


def test_an_on_the_fly_cache_refuses_to_be_read_as_shards_or_for_other_prompts(tmp_path):
    pipe = tiny_pipeline()

    def encode(batch):
        return encode_prompts(pipe, batch)

    with torch.no_grad():
        write_cache(tmp_path, PROMPTS, encode, CacheConfig(text_embeddings="on_the_fly"), "tiny",
                    log=lambda m: None)
    with pytest.raises(CacheError, match="holds no prompt embeddings.*on_the_fly"):
        EmbeddingCache(tmp_path)
    with pytest.raises(CacheError, match="no text encoder was given"):
        open_embeddings(tmp_path)
    with pytest.raises(CacheError, match="not those the cache .* was made for"):
        PromptEncoder(tmp_path, PROMPTS[:-1], encode)


def test_an_unknown_text_embeddings_mode_is_one_clear_config_error(tmp_path):
    root = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["cache"]["text_embeddings"] = "ram"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match="'ram' is not one of disk, on_the_fly"):
        load_all(tmp_path)


@pytest.mark.slow
def test_distill_trains_the_same_student_from_an_on_the_fly_cache(tmp_path_factory):
    """Two copies of the prepared micro world: one keeps its disk cache, the other re-runs
    cache_teacher with ``on_the_fly``; both distill the same two iterations."""
    students = {}
    for mode in ("disk", "on_the_fly"):
        root = prepared_project(tmp_path_factory.mktemp(mode) / "project", tmp_path_factory)
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["cache"]["text_embeddings"] = mode
        params["distill"]["loop"].update(steps=2, sample_every=2, checkpoint_every=2)
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        if mode == "on_the_fly":
            cache_teacher.run(root)
            assert not list((root / paths.CACHE).glob("shard-*"))
        distill.run(root)
        plan = json.loads((root / paths.DISTILL_OUT / "plan.json").read_text())
        text = plan["text_embeddings"]  # the pre-flight plan knows where the prompts come from
        assert text["mode"] == mode and text["prompts"] == len(
            (root / paths.TRAIN_PROMPTS).read_text().splitlines())
        assert ("text_encoders" in plan["memory_gib"]) == (mode == "on_the_fly")
        from safetensors.torch import load_file

        students[mode] = {name: load_file(f) for name, f in
                          ((f.relative_to(root / paths.STUDENT).as_posix(), f)
                           for f in sorted((root / paths.STUDENT).rglob("*.safetensors")))}
    assert students["disk"].keys() == students["on_the_fly"].keys() and students["disk"]
    for name, tensors in students["disk"].items():
        other = students["on_the_fly"][name]
        assert tensors.keys() == other.keys()
        for key, value in tensors.items():
            torch.testing.assert_close(value, other[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
