"""The COCO protocols and their parity with the reference implementations.

- our ``clean`` resize equals clean-fid's, bit for bit; the centre crop equals torchvision's
  (GigaGAN's evaluation calls it), including odd margins;
- pool3 features of clean-resized images equal clean-fid's own folder pipeline run with the same
  network, and our FID on two folders equals torch-fidelity's on the same features;
- image i comes from seed ``base + i`` whatever the batch size; the safety checker is off;
- captions are read verbatim from the real caption files (skipped where they are absent);
- the evaluate stage runs the COCO-2017 protocol end to end on tiny models.

The Inception network is real (~0.25 s per image on the 2-core CPU), so image sets are small.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from components.evaluation import inception as inception_mod
from components.evaluation.card import curve_points, result_cards
from components.evaluation.fid import (
    fid_against_statistics,
    inception_features,
    load_statistics,
    reference_statistics,
)
from components.evaluation.inception import load_inception, pool3_of_resized
from components.evaluation.protocols import (
    PHOTO_PREFIX,
    PROTOCOLS,
    captions_in_training,
    get_protocol,
    read_captions,
)
from components.evaluation.resize import Preprocess, center_crop_resize, clean_resize
from components.evaluation.suite import Reference
from tests.threads import one_thread  # noqa: F401
from tests.tiny import build_tiny_student, build_tiny_teacher, tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
COCO = ROOT.parent / "shared" / "data" / "coco"
COCO_PREPROCESS = PROTOCOLS["coco2014_30k"].preprocess


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    return load_inception(tmp_path_factory.mktemp("inception-cache"))


def photos(n: int, seed: int, sizes=((80, 60), (61, 90), (75, 75), (83, 80))) -> list[Image.Image]:
    """Smooth random RGB pictures of mixed sizes (odd margins included), as PIL images."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        noise = rng.integers(-20, 21, (h, w, 3))
        base = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=int)
        out.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)))
    return out


def gigagan_transform(image_np: np.ndarray, size: int = 256) -> np.ndarray:
    """The GigaGAN/DMD2 per-image transform clean-fid is given: torchvision's centre crop to the
    short side, then PIL LANCZOS to ``size`` (written from methods-reference §3.1 step 3)."""
    import torchvision.transforms.functional as TF

    image = Image.fromarray(image_np)
    image = TF.center_crop(image, min(image.size))
    return np.asarray(image.resize((size, size), Image.LANCZOS))


# --- preprocessing parity ------------------------------------------------------------------------

def test_clean_resize_equals_clean_fid():
    from cleanfid.resize import build_resizer

    theirs = build_resizer("clean")
    rng = np.random.default_rng(0)
    outs = []
    for shape in ((256, 256, 3), (48, 64, 3), (301, 299, 3), (299, 299, 3)):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        outs.append(clean_resize(image))
        assert outs[-1].dtype == np.float32 and outs[-1].shape == (299, 299, 3)
        np.testing.assert_array_equal(outs[-1], theirs(image))
    # Not quantised: the float output keeps fractions that a uint8 resize would round away.
    assert np.any(outs[0] != np.round(outs[0]))


def test_center_crop_equals_torchvision_including_odd_margins():
    for image in photos(4, seed=1):
        ours = np.asarray(center_crop_resize(image, 256))
        np.testing.assert_array_equal(ours, gigagan_transform(np.asarray(image)))
    # A margin of 3 is where a floor (1) and torchvision's rounding (round(1.5) = 2) differ; the
    # 83x80 photos above have one too.
    wide = Image.fromarray(np.arange(7 * 4 * 3, dtype=np.uint8).reshape(4, 7, 3))
    np.testing.assert_array_equal(np.asarray(center_crop_resize(wide, 4)),
                                  np.asarray(wide)[:, 2:6])


def test_preprocess_crop_describes_itself():
    images = np.stack([np.asarray(p.resize((80, 60))) for p in photos(2, seed=2)])
    out = COCO_PREPROCESS.crop(images)
    assert out.shape == (2, 256, 256, 3) and out.dtype == np.uint8
    assert "LANCZOS to 256x256" in COCO_PREPROCESS.describe()
    assert "clean-fid" in COCO_PREPROCESS.describe()
    np.testing.assert_array_equal(Preprocess().crop(images), images)  # the world: no crop


# --- features and FID parity --------------------------------------------------------------------

def test_pool3_of_resized_equals_torch_fidelity_and_torchscript(inception):
    images = np.random.default_rng(3).integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        theirs = inception.extractor(x)[0]  # its TF resize 299 -> 299 is the identity
        ours = pool3_of_resized(inception.extractor, x.float())
        scripted = torch.jit.load(str(inception_mod.fid_helper_file()), map_location="cpu").eval()
        clean = torch.from_numpy(np.stack([clean_resize(im) for im in images[:, :200, :250]]))
        clean = clean.permute(0, 3, 1, 2)
        reference = scripted((clean - 128) / 128)
        ours_clean = pool3_of_resized(inception.extractor, clean)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_clean, reference.float(), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="299"):
        pool3_of_resized(inception.extractor, x[:, :, :200].float())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("folders")
    for name, seed in (("ref", 10), ("gen", 11)):
        (base / name).mkdir()
        for i, image in enumerate(photos(8, seed)):
            image.save(base / name / f"{i:03d}.png")
    return base


def test_folder_features_equal_clean_fid_pipeline(inception, folders, tmp_path):
    from cleanfid.fid import get_folder_features

    mu, _, meta = reference_statistics(folders / "ref", tmp_path, inception, 4, COCO_PREPROCESS)
    ours = load_statistics(tmp_path / f"{meta['key']}.safetensors")["features"]
    theirs = get_folder_features(
        str(folders / "ref"), lambda x: pool3_of_resized(inception.extractor, x), num_workers=0,
        batch_size=4, device=torch.device("cpu"), mode="clean", verbose=False,
        custom_image_tranform=gigagan_transform)
    assert ours.shape == theirs.shape == (8, 2048)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    np.testing.assert_allclose(mu, theirs.astype(np.float64).mean(axis=0), atol=1e-5)
    assert meta["preprocess"] == {"crop_size": 256, "to_299": "clean"}


def test_fid_on_two_folders_equals_torch_fidelity_on_same_features(inception, folders, tmp_path):
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    mu, sigma, meta = reference_statistics(folders / "ref", tmp_path, inception, 4,
                                           COCO_PREPROCESS)
    ref_features = load_statistics(tmp_path / f"{meta['key']}.safetensors")["features"]
    generated = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((folders / "gen").iterdir())]
    gen = np.stack([np.asarray(center_crop_resize(Image.fromarray(g), 256)) for g in generated])
    gen_features = inception_features(gen, inception, 4, Preprocess(None, "clean"))
    ours = fid_against_statistics(mu, sigma, gen_features)
    theirs = fid_statistics_to_metric(
        fid_features_to_statistics(torch.from_numpy(ref_features.astype(np.float64))),
        fid_features_to_statistics(torch.from_numpy(gen_features)), verbose=False,
    )["frechet_inception_distance"]
    assert ours == pytest.approx(theirs, rel=1e-3)
    assert ours > 1.0


# --- generation: seeds and the safety checker ---------------------------------------------------

def test_per_image_seeds_give_the_same_images_whatever_the_batch_size(tmp_path):
    from components.generation import load_student, sample_teacher

    pipe = tiny_pipeline()
    prompts = ["a red circle", "a blue square", "a green triangle", "a cat", "a dog"]
    seeds = [7, 8, 9, 10, 11]
    runs = [sample_teacher(pipe, prompts, seeds, 3, 4.0, batch_size=b) for b in (1, 2, 5)]
    for other in runs[1:]:
        np.testing.assert_array_equal(runs[0], other)
    subset = sample_teacher(pipe, prompts[2:4], seeds[2:4], 3, 4.0, batch_size=2)
    np.testing.assert_array_equal(subset, runs[0][2:4])  # image i depends only on its own seed
    student = load_student(build_tiny_student(tmp_path / "student"))
    one = [student.generate(prompts, seeds, batch_size=b) for b in (1, 3, 5)]
    for other in one[1:]:
        np.testing.assert_array_equal(one[0], other)


def _blacking_out_safety_checker():
    """A random-weight SD safety checker whose thresholds flag every image as unsafe."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16)
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():  # score - threshold > 0 for every concept: everything is "NSFW"
        checker.concept_embeds_weights.fill_(-2.0)
        checker.special_care_embeds_weights.fill_(-2.0)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return checker, processor


def test_safety_checker_is_off_and_never_blacks_out_images(tmp_path):
    from diffusers import StableDiffusionPipeline

    from components.generation import sample_teacher
    from components.teacher import TeacherConfig, load_pipeline

    checker, processor = _blacking_out_safety_checker()
    pipe = tiny_pipeline()
    with_checker = StableDiffusionPipeline(**{**pipe.components, "safety_checker": checker,
                                              "feature_extractor": processor},
                                           requires_safety_checker=True)
    with_checker.save_pretrained(tmp_path / "teacher", safe_serialization=True)
    call = {"prompt": ["a red circle", "a blue square"], "num_inference_steps": 2,
            "output_type": "np", "generator": torch.Generator().manual_seed(0)}
    # Control: loaded as saved, the checker flags everything and blacks the images out.
    control = StableDiffusionPipeline.from_pretrained(tmp_path / "teacher")
    control.set_progress_bar_config(disable=True)
    out = control(**call)
    assert all(out.nsfw_content_detected) and np.all(out.images == 0)
    loaded = load_pipeline(TeacherConfig(str(tmp_path / "teacher")), tmp_path)
    assert loaded.safety_checker is None
    out = loaded(**{**call, "generator": torch.Generator().manual_seed(0)})
    assert out.nsfw_content_detected is None and np.abs(out.images).max() > 0
    images = sample_teacher(loaded, call["prompt"], [0, 1], 2, 4.0)
    assert images.max() > 0 and all(im.max() > 0 for im in images)


# --- captions, CLIP prefix, protocol bookkeeping ------------------------------------------------

@pytest.mark.skipif(not (COCO / "gigagan_coco2014_30k_captions.txt").is_file(),
                    reason="shared COCO caption files are absent")
def test_real_caption_files_are_read_verbatim():
    path = COCO / "gigagan_coco2014_30k_captions.txt"
    assert hashlib.md5(path.read_bytes()).hexdigest() == "20ed79e6a73d7b8fdbfb6ebc8c5c7e99"
    captions = read_captions(path, "text")
    assert len(captions) == 30000 == get_protocol("coco2014_30k").size
    assert captions == path.read_text(encoding="utf-8").splitlines()  # no strip, no dedupe
    five_k = read_captions(COCO / "captions_val2017.json", "coco")
    assert len(five_k) == 5000 == get_protocol("coco2017_5k").size
    data = json.loads((COCO / "captions_val2017.json").read_text())
    first_image = min(a["image_id"] for a in data["annotations"])
    first = min((a for a in data["annotations"] if a["image_id"] == first_image),
                key=lambda a: a["id"])
    assert five_k[0] == first["caption"]


def test_coco_json_gives_one_caption_per_image(tmp_path):
    data = {"images": [], "annotations": [
        {"id": 9, "image_id": 2, "caption": "second image, later caption"},
        {"id": 3, "image_id": 2, "caption": " second image, first caption "},
        {"id": 5, "image_id": 1, "caption": "first image"}]}
    (tmp_path / "c.json").write_text(json.dumps(data))
    assert read_captions(tmp_path / "c.json", "coco") == ["first image",
                                                          " second image, first caption "]
    with pytest.raises(ValueError, match="not a COCO captions JSON"):
        (tmp_path / "bad.json").write_text("[]")
        read_captions(tmp_path / "bad.json", "coco")
    with pytest.raises(FileNotFoundError, match="evaluate.captions"):
        read_captions(tmp_path / "missing.txt", "text")
    with pytest.raises(ValueError, match="valid protocols are: world, coco2014_30k, coco2017_5k"):
        get_protocol("coco")


def test_photo_prefix_tokenizes_like_gigagan_token_splice():
    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-g-14")  # the BPE vocabulary only, no weights
    captions = ["A man riding a horse.", " ".join(["very long caption"] * 40)]
    prefixed = tokenizer([PHOTO_PREFIX + c for c in captions])
    # GigaGAN/DMD2: start token, the prefix's 3 tokens, the caption's tokens; cut to 77 and the
    # last position set to the end token when it is not padding.
    plain = tokenizer(captions)
    prefix = tokenizer([PHOTO_PREFIX])[:, 1:4].expand(len(captions), -1)
    spliced = torch.cat([plain[:, :1], prefix, plain[:, 1:]], dim=1)[:, :77]
    last = spliced[:, 76:77].clone()
    last[last > 0] = 49407
    spliced = torch.cat([spliced[:, :76], last], dim=1)
    torch.testing.assert_close(prefixed, spliced)


def test_leaked_captions_are_found():
    leaked = captions_in_training(["A cat on a mat.", "A dog"], ["a cat on a mat", "a bird"])
    assert leaked == ["A cat on a mat."]


def test_reference_made_for_another_protocol_is_refused():
    meta = {"preprocess": {"crop_size": None, "to_299": "tf-bilinear"}}
    ref = Reference(np.zeros(2), np.eye(2), None, meta)
    ref.check_preprocess(get_protocol("world"))
    with pytest.raises(ValueError, match="reference.protocol: coco2017_5k"):
        ref.check_preprocess(get_protocol("coco2017_5k"))


def test_cards_and_curve_points():
    rows = {"teacher": {"row": {"fid": 3.0, "clip_score": 0.3, "steps": 25,
                                "guidance_scale": 4.0}, "latency": {"median_s": 1.0}},
            "curve_s2": {"row": {"fid": 2.0, "clip_score": 0.28, "steps": 25,
                                 "guidance_scale": 2.0}},
            "teacher_1step": {"row": {"fid": 9.0, "clip_score": 0.2, "steps": 1,
                                      "guidance_scale": 1.0}},
            "student": {"row": {"fid": 4.0, "clip_score": 0.29, "steps": 1}}}
    common = {"protocol": "coco2017_5k", "caption_list_sha256": "c" * 64, "n_images": 100,
              "protocol_size": 5000, "complete": False, "reference_sha256": "r" * 64,
              "reference_stats_key": "k", "resize": COCO_PREPROCESS.describe(),
              "feature_network": "inception", "feature_weights_sha256": "w" * 64,
              "clip_model": "ViT-g-14:laion2b_s12b_b42k", "clip_weights": "laion2b_s12b_b42k",
              "clip_prefix": PHOTO_PREFIX, "base_seed": 0, "precision": "fp32", "device": "cpu"}
    cards = result_cards(common, rows)
    assert cards["teacher"]["guidance_scale"] == 4.0 and cards["teacher"]["latency"]
    assert cards["teacher_1step"]["guidance_scale"] is None
    assert cards["student"]["guidance_scale"] is None and cards["student"]["steps"] == 1
    assert not cards["student"]["complete"] and cards["student"]["protocol_size"] == 5000
    with pytest.raises(Exception, match="complete=True"):
        result_cards({**common, "complete": True}, {"student": rows["student"]})
    points = curve_points([r["row"] for r in rows.values()], [2.0, 4.0])
    assert [p["guidance_scale"] for p in points] == [2.0, 4.0]


# --- the evaluate stage on the COCO-2017 protocol, tiny models ----------------------------------

def _random_scorer(folder: Path) -> None:
    import open_clip

    from components.evaluation.scorer import ScorerConfig, save_scorer

    cfg = ScorerConfig(vision_width=32, vision_layers=1, text_width=32, text_layers=1,
                       head_width=16, embed_dim=32, patch_size=8)
    torch.manual_seed(0)
    save_scorer(open_clip.CLIP(**cfg.model_cfg()), cfg, folder)


def test_evaluate_stage_runs_the_coco2017_protocol(tmp_path):
    from pipeline.stages import evaluate, reference_stats

    root = tmp_path / "project"
    params = yaml.safe_load((ROOT / "pipeline" / "presets" / "micro.yaml").read_text())
    for i, image in enumerate(photos(6, seed=20)):
        (root / "val2017").mkdir(parents=True, exist_ok=True)
        image.save(root / "val2017" / f"{i:012d}.jpg", quality=95)
    captions = {"images": [], "annotations": [
        {"id": i, "image_id": 100 + i, "caption": f"a photo of thing number {i}"}
        for i in range(6)]}
    (root / "annotations").mkdir()
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps(captions))
    (root / "data" / "prompts").mkdir(parents=True)
    (root / "data" / "prompts" / "train.txt").write_text("a red circle\na blue square\n")
    build_tiny_teacher(root / "models" / "teacher")
    build_tiny_student(root / "models" / "student")
    _random_scorer(root / "models" / "scorer")
    params["reference"] = {"images": "val2017", "protocol": "coco2017_5k", "batch_size": 4}
    params["evaluate"] = {
        "protocol": "coco2017_5k", "captions": "annotations/captions_val2017.json",
        "num_images": 4, "teacher_steps": 2, "teacher_guidance_scale": 4.0,
        "curve_guidance_scales": [2.0, 4.0], "scorer": "models/scorer", "batch_size": 4,
        "grid_images": 2, "latency_repeats": 1, "latency_warmup": 0}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    reference_stats.run(root)
    evaluate.run(root)
    doc = json.loads((root / "outputs" / "eval" / "eval_card.json").read_text())
    card = doc["student"]["card"]
    assert card["protocol"] == "coco2017_5k" and card["n_images"] == 4
    assert card["protocol_size"] == 5000 and card["complete"] is False
    assert card["clip_prefix"] == PHOTO_PREFIX and card["caption_file"] == "captions_val2017.json"
    assert "clean-fid" in card["resize"] and card["n_reference"] == 6
    assert card["safety_checker"] == "off" and card["latency"]["batch"] == 1
    metrics = json.loads((root / "metrics" / "eval.json").read_text())
    for name in ("student", "teacher", "teacher_1step"):
        assert metrics[name]["fid"] > 0 and 0 <= metrics[name]["precision"] <= 1
        assert np.isfinite(metrics[name]["kid_mean"])
    assert sorted(metrics["teacher_curve"]) == ["s2", "s4"]
    assert metrics["latency"]["speedup"] > 0
    assert (root / "outputs" / "eval" / "fid_clip_curve.png").stat().st_size > 0
    # A second evaluation reuses every teacher run from the cache.
    before = sorted(p.name for p in (root / ".cache" / "eval").iterdir())
    evaluate.run(root)
    assert sorted(p.name for p in (root / ".cache" / "eval").iterdir()) == before
    # Evaluation captions among the training prompts are refused.
    (root / "data" / "prompts" / "train.txt").write_text("a photo of thing number 2\n")
    with pytest.raises(ValueError, match="also training prompts"):
        evaluate.run(root)


def test_coco_protocols_default_to_vit_g_14_and_say_how_to_supply_it(monkeypatch, tmp_path):
    import huggingface_hub.constants

    from components.config import ConfigError, from_dict
    from components.evaluation.clip_score import ScorerWeightsMissing, load_scorer
    from pipeline.params import EvaluateConfig

    cfg = from_dict(EvaluateConfig, {"protocol": "coco2014_30k", "scorer": None}, "evaluate")
    assert cfg.scorer_spec() == "ViT-g-14:laion2b_s12b_b42k"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # empty cache
    with pytest.raises(ScorerWeightsMissing, match="open_clip_pytorch_model.bin"):
        load_scorer(cfg.scorer_spec())
    with pytest.raises(ConfigError, match="no published CLIP model"):
        from_dict(EvaluateConfig, {"protocol": "world", "scorer": None}, "evaluate")
    with pytest.raises(ConfigError, match="valid protocols are"):
        from_dict(EvaluateConfig, {"protocol": "coco30k"}, "evaluate")
