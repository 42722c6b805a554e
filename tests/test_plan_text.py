"""The plan's text embeddings (components/planning/text.py): what a disk cache of every prompt
takes, what the text encoders take on each GPU when they encode on the fly, and which to use."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from components.planning import make_plan
from components.planning.estimate import GIB, HEADROOM
from components.planning.teachers import flow_spec
from components.planning.text import TextRequest, text_plan
from pipeline import plan as plan_cli
from tests.test_plan import _request
from tests.tiny import build_tiny_teacher

CLIP_L, CLIP_G, T5_XXL = 123_060_480, 694_659_840, 4_762_310_656  # the released encoders


def _text(arch: str, mode: str = "disk", prompts: int | None = 1_000_000,
          precision: str = "bf16") -> TextRequest:
    flow = arch in ("flux1", "sd35m", "sana")
    spec = flow_spec(arch) if flow else plan_cli.teacher_spec(None, Path("."), arch)
    return plan_cli.text_request(None, Path("."), spec, arch, mode, "float16", precision, prompts)


def test_the_released_text_encoders_and_what_one_prompt_stores():
    flux, sd35, sdxl, sd15 = (_text(a) for a in ("flux1", "sd35m", "sdxl", "sd15"))
    # CLIP-L (+ CLIP-G) + T5-XXL's encoder; SD3.5's CLIPs carry their projections
    assert [e.parameters for e in flux.encoders] == [CLIP_L, T5_XXL]
    assert [e.tokens for e in flux.encoders] == [77, 512]
    assert [e.tokens for e in sd35.encoders] == [77, 77, 256]
    assert sum(e.parameters for e in sd35.encoders) == CLIP_L + 768 * 768 + CLIP_G + T5_XXL
    assert [e.parameters for e in sdxl.encoders] == [CLIP_L, CLIP_G]
    # the sequence, the pooled embedding, SDXL's time ids; fp16
    assert flux.bytes_per_prompt == (512 * 4096 + 768) * 2
    assert sd35.bytes_per_prompt == ((77 + 256) * 4096 + 2048) * 2
    assert sdxl.bytes_per_prompt == (77 * 2048 + 1280 + 6) * 2
    assert sd15.bytes_per_prompt == 77 * 768 * 2
    assert flux.encoder_bytes == (CLIP_L + T5_XXL) * 2  # bf16 weights
    # embeddings are lookups: T5's 32,128 x 4,096 token table and its 32-bucket x 64-head
    # relative position bias do no multiply
    assert flux.encoders[1].matmul_parameters == T5_XXL - 32_128 * 4096 - 32 * 64


def test_sana_encodes_300_gemma_tokens_and_stores_them_with_their_mask():
    sana = _text("sana")
    assert [(e.slot, e.parameters, e.tokens) for e in sana.encoders] == [
        ("text_encoder", 2_614_341_888, 300)]
    assert sana.bytes_per_prompt == (300 * 2304 + 300) * 2  # sequence and mask, fp16
    # Gemma-2's 256,000 x 2,304 token table is a lookup
    assert sana.encoders[0].matmul_parameters == 2_614_341_888 - 256_000 * 2304


def test_disk_within_the_budget_else_on_the_fly_where_it_fits_else_neither():
    flux = _text("flux1")
    usable = 72 * GIB
    small = text_plan(replace(flux, prompts=10_000), 20 * GIB, usable, 256, 8, 400e12)
    assert small["recommended"] == "disk" and small["disk_gib"] == pytest.approx(39.08, abs=0.01)
    big = text_plan(flux, 20 * GIB, usable, 256, 8, 400e12)
    assert big["disk_gib"] > 3900 and big["recommended"] == "on_the_fly", big["reason"]
    # 256 prompts over 8 GPUs: 32 each, 2 x 4.64e9 matmul weights x 512 tokens ... at 400 TFLOP/s
    per_prompt = 2 * (flux.encoders[0].matmul_parameters * 77
                      + flux.encoders[1].matmul_parameters * 512)
    assert big["on_the_fly_seconds_per_iteration"] == pytest.approx(32 * per_prompt / 400e12,
                                                                    rel=1e-3)
    crowded = text_plan(flux, 65 * GIB, usable, 256, 8, 400e12)  # 8.9 GiB do not fit beside
    assert crowded["recommended"] is None and "neither fits" in crowded["reason"]
    unknown = text_plan(replace(flux, prompts=None), 20 * GIB, usable, 256, 8, 400e12)
    assert unknown["recommended"] is None and "--prompts" in unknown["reason"]


def test_encoding_on_the_fly_is_counted_in_memory_time_and_the_largest_micro_batch():
    sd15 = _text("sd15", prompts=100, precision="fp32")
    disk = make_plan(_request(80.0, text=sd15), suggest=False)
    fly = make_plan(_request(80.0, text=replace(sd15, mode="on_the_fly")), suggest=False)
    encoders = CLIP_L * 4 / GIB
    assert "text_encoders" not in disk["memory_gib"]
    assert fly["memory_gib"]["text_encoders"] == pytest.approx(encoders, abs=1e-3)
    assert fly["memory_gib"]["total"] == pytest.approx(disk["memory_gib"]["total"] + encoders,
                                                       abs=2e-3)
    extra = fly["text_embeddings"]["on_the_fly_seconds_per_iteration"]
    assert extra > 0 and fly["time"]["seconds_per_iteration"] == pytest.approx(
        disk["time"]["seconds_per_iteration"] + extra, rel=1e-3)
    # a GPU on which the disk run fits and the encoders do not
    tight = (disk["memory_gib"]["total"] + encoders / 2) / (1 - HEADROOM)
    assert make_plan(_request(tight, text=sd15), suggest=False)["fits"]
    squeezed = make_plan(_request(tight, text=replace(sd15, mode="on_the_fly")), suggest=False)
    assert not squeezed["fits"]
    assert squeezed["recommendation"]["largest_micro_batch"] < disk["recommendation"][
        "largest_micro_batch"]


def test_cli_says_which_mode_for_the_configured_teacher(tmp_path, capsys):
    root = tmp_path / "project"
    build_tiny_teacher(root / "models/teacher")
    params = yaml.safe_load(Path("params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "plan.json"
    plan_cli.main(["--root", str(root), "--method", "swiftbrush", "--global-batch", "4",
                   "--steps", "10", "--prompts", "1000000", "--disk-budget", "0.01",
                   "--out", str(out)])
    text = json.loads(out.read_text())["text_embeddings"]
    assert text["mode"] == "disk" and text["recommended"] == "on_the_fly", text
    assert text["prompts"] == 1_000_000 and text["encoders"][0]["slot"] == "text_encoder"
    printed = capsys.readouterr().out
    assert "text embeddings (disk)" in printed and "recommended: on_the_fly" in printed
