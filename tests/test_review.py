"""The review page: its samples format, the page itself, its place in a real MLflow store, and
what a real headless browser (Debian's chromium) draws of it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.evaluation.samples import read_samples, write_samples
from components.registry.gate import Lineage, RegisterConfig
from components.registry.review import Side, curves_from_csv, review_page
from components.registry.store import artifact_location, register_student, tracking_uri
from tests.threads import one_thread  # noqa: F401

CAPTIONS = ["a red circle <left>", "a blue square", "a green triangle"]
SEEDS = [0, 1, 2]
# one flat colour per row, so a screenshot tells which images were drawn where
RED, BLUE, GREEN = (230, 20, 20), (20, 20, 230), (20, 200, 20)


def flat(colour, n=3, size=32) -> np.ndarray:
    return np.broadcast_to(np.array(colour, np.uint8), (n, size, size, 3)).copy()


def eval_dir(folder: Path, student_colour) -> Path:
    write_samples(folder, CAPTIONS, SEEDS, {"student": flat(student_colour),
                                            "teacher": flat(GREEN),
                                            "teacher_1step": flat((90, 90, 90))})
    return folder


def curves_dir(folder: Path, scale: float) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    loss, fid = folder / "distill_loss.csv", folder / "distill_fid.csv"
    loss.write_text("step,grad_norm,loss_vsd\n" + "".join(
        f"{s},0.1,{scale / s:.4f}\n" for s in range(1, 11)))
    fid.write_text("step,proxy_fid\n" + "".join(f"{s},{300 - s * scale:.2f}\n" for s in (5, 10)))
    return loss, fid


def side(version, colour, tmp_path, fid=200.0, fid_std=2.0) -> Side:
    samples = read_samples(eval_dir(tmp_path / f"eval{version}", colour))
    metrics = {"fid": fid, "fid_std": fid_std, "clip_score": 0.3, "clip_score_std": 0.004,
               "teacher.fid": 150.0, "teacher.fid_std": 1.5}
    return Side(version, metrics, {"method": "sid_lsg", "git_commit": f"c{version}"}, samples,
                curves_from_csv(*curves_dir(tmp_path / f"curves{version}", float(version))))


# ---------------------------------------------------------------- pure


def test_samples_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
    write_samples(tmp_path, CAPTIONS, SEEDS, {"student": images})
    back = read_samples(tmp_path)
    assert back.captions == CAPTIONS and back.seeds == SEEDS
    np.testing.assert_array_equal(back.rows["student"], images)
    assert read_samples(tmp_path / "none") is None
    with pytest.raises(ValueError, match="expected uint8 \\(3, H, W, 3\\)"):
        write_samples(tmp_path, CAPTIONS, SEEDS, {"student": images[:2]})


def test_page_shows_both_versions_metrics_verdict_curves_and_lineage(tmp_path):
    candidate, champion = side("2", RED, tmp_path, fid=197.0), side("1", BLUE, tmp_path)
    page = review_page("m", candidate, champion, False, "fid not lower by at least 5.66", 2.0)
    assert page.count("<img ") == 3 * 3  # candidate, champion, teacher per caption
    assert page.count("<figcaption>") == 3 and "a red circle &lt;left&gt;" in page
    assert "(seed 2)" in page and "stays candidate" in page and "at least 5.66" in page
    assert "197.00 ± 2.00" in page and "-3.00 ± 2.83" in page and "inside the noise" in page
    assert page.count("<svg") == 2 and "v2 loss_vsd" in page and "v1 proxy_fid" in page
    assert "grad_norm" not in page  # only losses on the loss chart
    assert "<code>c2</code>" in page and "<code>c1</code>" in page
    assert "http" not in page.replace("http://www.w3.org/2000/svg", "")  # nothing fetched
    far = review_page("m", side("3", RED, tmp_path, fid=180.0), champion, True, "better", 2.0)
    assert "outside the noise" in far and "promoted to champion" in far
    alone = review_page("m", candidate, None, True, "no champion yet", 2.0)
    assert alone.count("<img ") == 2 * 3 and "no champion yet" in alone


def test_champion_with_other_captions_is_not_shown_side_by_side(tmp_path):
    champion = side("1", BLUE, tmp_path)
    other = Side("1", champion.metrics, champion.tags,
                 type(champion.samples)(["x", "y", "z"], SEEDS, champion.samples.rows))
    page = review_page("m", side("2", RED, tmp_path), other, False, "r", 2.0)
    assert page.count("<img ") == 2 * 3 and "no samples for these captions" in page


# ---------------------------------------------------------------- in MLflow


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    from tests.tiny import build_tiny_student

    return build_tiny_student(tmp_path_factory.mktemp("student") / "student")


def register_with_review(cfg, student, uri, root: Path, version_colour, fid):
    from components.registry.review_store import candidate_side, current_champion, publish_review

    work = root / f"run-{fid:g}"
    evaluation = eval_dir(work / "eval", version_colour)
    loss, proxy = curves_dir(work, fid / 100)
    lineage = Lineage("abc123", "sid_lsg", "tiny", "ph", "world-1")
    champion = current_champion(uri, cfg)
    result = register_student(cfg, student, {"fid": fid, "fid_std": 2.0, "clip_score": 0.3,
                                             "clip_score_std": 0.001}, lineage, uri=uri,
                              artifact_root=artifact_location(root, uri),
                              artifacts=[evaluation, loss, proxy])
    candidate = candidate_side(uri, cfg, result["version"], evaluation, loss, proxy)
    return result, publish_review(uri, cfg, result, candidate, champion, work / "review")


def test_review_page_is_logged_with_the_version(student, tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    from pipeline import registry_cli

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking_uri(tmp_path)
    cfg = RegisterConfig("tiny-review-page", "review", fid_margin=0.5, clip_tolerance=0.01)
    first, _ = register_with_review(cfg, student, uri, tmp_path, BLUE, 200.0)
    second, review = register_with_review(cfg, student, uri, tmp_path, RED, 197.0)
    assert first["promoted"] and not second["promoted"]  # 3.0 better, inside 2 x 2.83
    page = Path(review["path"]).read_text()
    assert page.count("<img ") == 9 and "champion version 1" in page
    assert "stays candidate" in page and "inside the noise" in page
    client = MlflowClient(uri, registry_uri=uri)
    version = client.get_model_version(cfg.model_name, "2")
    assert version.tags["review_page"] == review["artifact_uri"]
    assert "review/review.html" in [a.path for a in client.list_artifacts(second["run_id"],
                                                                           "review")]
    logged = Path(review["artifact_uri"].removeprefix("file://"))
    assert logged.read_text() == page
    (tmp_path / "params.yaml").write_text(
        f"register: {{model_name: {cfg.model_name}, experiment: review, fid_margin: 0.5, "
        "clip_tolerance: 0.01}\n")
    registry_cli.main(["--root", str(tmp_path), "--tracking-uri", uri, "compare"])
    out = capsys.readouterr().out
    assert f"review page: {logged}" in out
    assert "| FID ↓ | 197.000 ± 2.000 | 200.000 ± 2.000 |" in out


# ---------------------------------------------------------------- in a real browser


def screenshot(page: Path, out: Path, size=(1100, 1000)) -> np.ndarray:
    """The page as Debian's chromium draws it headless (no network, no GPU), as RGB pixels."""
    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("chromium is not installed (.ci/run installs it: apt-get install chromium)")
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--force-device-scale-factor=1", f"--user-data-dir={out.parent / 'profile'}",
                    f"--window-size={size[0]},{size[1]}", f"--screenshot={out}",
                    page.as_uri()], check=True, capture_output=True, timeout=120)
    return np.asarray(Image.open(out).convert("RGB")).astype(int)


def colour_box(pixels: np.ndarray, colour) -> tuple[int, tuple[int, int, int, int] | None]:
    """How many pixels are within 12 of ``colour``, and their bounding box (top, bottom, left,
    right)."""
    near = (np.abs(pixels - np.array(colour)).max(axis=-1) <= 12)
    if not near.any():
        return 0, None
    rows, cols = np.nonzero(near)
    return int(near.sum()), (rows.min(), rows.max(), cols.min(), cols.max())


def test_browser_renders_the_images_side_by_side(tmp_path):
    page = tmp_path / "review.html"
    page.write_text(review_page("m", side("2", RED, tmp_path, fid=197.0),
                                side("1", BLUE, tmp_path), False, "inside the noise", 2.0))
    pixels = screenshot(page, tmp_path / "shot.png")
    cell = 96 * 96  # each 32 px sample drawn at 96 x 96 CSS px
    found = {name: colour_box(pixels, c) for name, c in
             (("candidate", RED), ("champion", BLUE), ("teacher", GREEN))}
    for name, (count, _) in found.items():
        assert count >= 0.95 * 3 * cell, (name, count)  # all three images of the row drawn
    # the rows stack in order, each three images wide, side by side in the same columns
    (_, cand), (_, champ), (_, teach) = found.values()
    assert cand[1] < champ[0] and champ[1] < teach[0]
    assert cand[2:] == champ[2:] == teach[2:] and cand[3] - cand[2] > 3 * 96
    # the captions are written under the images: dark text pixels below the teacher row
    below = pixels[teach[1] + 1: teach[1] + 40, cand[2]: cand[3]]
    assert (below.max(axis=-1) < 100).sum() > 100


def test_review_page_through_a_tracking_server(student, mlflow_server, tmp_path, monkeypatch):
    """The same through ``mlflow server``: the champion's samples come back over HTTP and the
    page is stored in the server's artifact store."""
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = mlflow_server.uri
    cfg = RegisterConfig("tiny-review-server", "review", fid_margin=0.5, clip_tolerance=0.01)
    register_with_review(cfg, student, uri, tmp_path, BLUE, 200.0)
    second, review = register_with_review(cfg, student, uri, tmp_path, RED, 180.0)
    assert second["promoted"]  # 20 better: outside the noise
    page = Path(review["path"]).read_text()
    assert page.count("<img ") == 9 and "promoted to champion" in page
    assert "outside the noise" in page
    assert review["artifact_uri"].startswith("mlflow-artifacts:/")
    client = MlflowClient(uri, registry_uri=uri)
    fetched = Path(client.download_artifacts(second["run_id"], "review/review.html", str(tmp_path)))
    assert fetched.read_text() == page
