"""The miniature world: rendering, judging, caption split, COCO export, tokenizer, micro build."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from components.config import ConfigError, from_dict
from components.world import build_world
from components.world.config import DataConfig, WorldConfig
from components.world.dataset import caption_space_size, is_held_out, render_splits
from components.world.export import read_split, write_split
from components.world.render import (
    COLOURS,
    SceneSpace,
    attribute_accuracy,
    caption,
    chance_levels,
    parse_caption,
    render,
    sample_scene,
)
from components.world.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WIDE = SceneSpace(colours=tuple(COLOURS), max_objects=4)


def _scenes(space: SceneSpace, n: int, seed: int):
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(space, rng) for _ in range(n)]
    return scenes, np.stack([render(s, 32, rng) for s in scenes])


def test_render_is_deterministic_in_the_seed():
    a, b, c = _scenes(WIDE, 20, 1), _scenes(WIDE, 20, 1), _scenes(WIDE, 20, 2)
    assert a[0] == b[0] and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    assert a[1].dtype == np.uint8 and a[1].shape == (20, 32, 32, 3)


def test_caption_parse_round_trip():
    scenes, _ = _scenes(WIDE, 200, 3)
    for scene in scenes:
        assert parse_caption(caption(scene)) == scene
    text = (
        "a large red circle in the top left and a small blue square in the bottom right, "
        "on a gray background"
    )
    assert caption(parse_caption(text)) == text
    with pytest.raises(ValueError):
        parse_caption("a photo of a cat")


@pytest.mark.parametrize("max_objects", [1, 2, 4])
def test_attribute_accuracy_is_one_on_ground_truth(max_objects):
    scenes, images = _scenes(SceneSpace(colours=tuple(COLOURS), max_objects=max_objects), 300, 4)
    acc = attribute_accuracy(images, [caption(s) for s in scenes])
    assert acc == {k: 1.0 for k in ("all", "background", "colour", "position", "shape", "size")}


def test_attribute_accuracy_sees_wrong_captions():
    space = SceneSpace()
    scenes, images = _scenes(space, 400, 5)
    shuffled = [caption(s) for s in scenes[1:] + scenes[:1]]
    acc = attribute_accuracy(images, shuffled)
    chance = chance_levels(space)
    for key in ("colour", "position", "background", "shape"):
        assert abs(acc[key] - chance[key]) < 0.1, (key, acc[key], chance[key])
    blank = np.full_like(images, 128)
    assert attribute_accuracy(blank, [caption(s) for s in scenes])["colour"] == 0.0


def test_caption_split_holds_out_eval_captions():
    cfg = DataConfig(n_train=400, n_reference=20, n_eval=30, holdout=0.2)
    splits = render_splits(cfg, seed=7)
    train, evals = set(splits["train"][1]), set(splits["eval"][1])
    assert evals and not evals & train and not set(splits["reference"][1]) & train
    assert all(is_held_out(c, 0.2, 7) for c in evals)
    assert caption_space_size(cfg.space) == 3 * 4 * 2 * 4 * 3


def test_coco_export_round_trip(tmp_path):
    scenes, images = _scenes(WIDE, 12, 6)
    captions = [caption(s) for s in scenes]
    write_split(tmp_path / "eval", images, captions)
    back, back_captions = read_split(tmp_path / "eval")
    assert np.array_equal(back, images) and back_captions == captions
    data = __import__("json").loads((tmp_path / "eval" / "captions.json").read_text())
    assert data["images"][0] == {"id": 0, "file_name": "000000.png", "width": 32, "height": 32}
    assert data["annotations"][3] == {"id": 3, "image_id": 3, "caption": captions[3]}


def test_tokenizer_ids_equal_open_clip():
    import open_clip

    tokenizer = build_tokenizer()
    texts = [
        "a large red circle in the top left, on a gray background",
        "A photo of two cats on a sofa!",
        "naïve café, 1234 emoji-free text",
    ]
    for text in texts:
        ref = open_clip.tokenize([text])[0].tolist()
        assert tokenizer(text).input_ids == ref[: ref.index(49407) + 1]
    padded = tokenizer(texts[0], padding="max_length").input_ids
    assert len(padded) == tokenizer.model_max_length == 77


def preset(name: str) -> WorldConfig:
    """The ``world`` section of a shipped params file (``default`` is ``params.yaml``)."""
    path = ROOT / "params.yaml" if name == "default" else ROOT / f"pipeline/presets/{name}.yaml"
    return from_dict(WorldConfig, yaml.safe_load(path.read_text())["world"], f"world[{name}]")


def test_presets_load_and_unknown_keys_fail():
    for name in ("micro", "default", "gpu"):
        assert preset(name).data.image_size >= 32
    with pytest.raises(ConfigError, match="valid keys"):
        from_dict(WorldConfig, {"unet": {"chanels": [8]}}, "world")


def test_micro_build_loads_in_diffusers_and_samples(tmp_path):
    from diffusers import StableDiffusionPipeline

    report = build_world(preset("micro"), tmp_path / "data", tmp_path / "teacher", log=lambda m: 0)
    assert set(report["accuracy"]) == {"cfg", "one_step"}
    assert report["splits"]["eval_captions_in_train"] == 0
    for split in ("train", "reference", "eval"):
        images, captions = read_split(tmp_path / "data" / split)
        assert len(images) == len(captions) > 0
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "teacher")
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        ["a small red square in the top right, on a black background"],
        num_inference_steps=2,
        guidance_scale=4.0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


def test_teacher_training_is_deterministic():
    from components.world.config import TextConfig, UNetConfig, VaeConfig
    from components.world.models import build_text_encoder, build_unet, build_vae
    from components.world.train import train_unet, train_vae

    images = torch.from_numpy(_scenes(SceneSpace(), 8, 0)[1])
    ids = torch.randint(0, 49408, (8, 77), generator=torch.Generator().manual_seed(0))

    def once():
        torch.manual_seed(0)
        vae = build_vae(VaeConfig(channels=(8, 8), steps=2, batch=4), 32)
        text = build_text_encoder(TextConfig(hidden=16, layers=1, heads=2), 49408)
        unet = build_unet(UNetConfig(channels=(16, 16), steps=2, batch=4), 16, 4, 16)
        cfg = UNetConfig(steps=2, batch=4, warmup=1)
        a = train_vae(vae, images, VaeConfig(steps=2, batch=4), seed=1, log=lambda m, s: 0)
        b = train_unet(unet, text, torch.randn(8, 4, 16, 16), ids, ids[0], cfg, 1, lambda m, s: 0)
        return a["final_loss"], b["final_loss"], next(unet.parameters()).detach().clone()

    first, second = once(), once()
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])


def test_short_context_fits_the_captions_or_fails_clearly():
    from components.world.build import build_denoiser
    from components.world.config import TextConfig, UNetConfig

    captions = [caption(s) for s in _scenes(SceneSpace(), 4, 0)[0]]
    latents = torch.zeros(4, 4, 8, 8)
    small = {"unet": UNetConfig(channels=(16, 16), attention=(True, True))}
    fits = WorldConfig(text=TextConfig(hidden=16, layers=0, heads=2, max_length=16), **small)
    parts = build_denoiser(fits, latents, captions)
    assert parts["ids"].shape == (4, 16) and parts["empty_ids"].shape == (16,)
    assert parts["text_encoder"](parts["ids"])[0].shape == (4, 16, 16)
    short = WorldConfig(text=TextConfig(hidden=16, layers=1, heads=2, max_length=8), **small)
    with pytest.raises(ValueError, match="max_length is 8; raise it to at least 15"):
        build_denoiser(short, latents, captions)


def test_floor_renders_follow_the_prepared_rows(tmp_path):
    from components.world.floors import renders_of

    scenes, images = _scenes(SceneSpace(), 5, 8)
    write_split(tmp_path / "eval", images, [caption(s) for s in scenes])
    rows = [{"caption": caption(scenes[i]), "image_id": i, "annotation_id": i} for i in (3, 0, 3)]
    assert np.array_equal(renders_of(tmp_path / "eval", rows), images[[3, 0, 3]])
    with pytest.raises(ValueError, match="no render .* image id 9"):
        renders_of(tmp_path / "eval", rows + [{"caption": "x", "image_id": 9}])
