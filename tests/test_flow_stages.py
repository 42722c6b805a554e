"""The stage DAG on a flow teacher: prepare_prompts → cache_teacher → reference_stats → distill →
evaluate → register run their entry points on a tiny random SD3.5-style teacher folder (with a
T5 encoder), for a pair method (InstaFlow; 20 s with the caches on the idle 2-core CPU) and a
score method (SwiftBrush). Each student folder is a plain ``StableDiffusion3Pipeline`` folder
that the stock pipeline loads and that reproduces our generation, and the registered pyfunc
model generates the same images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from components.config import ConfigError
from components.generation import load_student
from pipeline import paths
from pipeline.params import load_all
from pipeline.stages import cache_teacher, distill, evaluate, prepare_prompts, reference_stats
from pipeline.stages import register as register_stage
from tests.test_flow_students import stock_images
from tests.test_protocols import _random_scorer, photos
from tests.threads import one_thread  # noqa: F401
from tests.tiny_flow import tiny_sana_pipeline, tiny_sd3_pipeline

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["a red circle", "a blue square", "a green triangle on the left", "a yellow circle",
         "two purple stars at the top", "a small black triangle"]
EVAL = [f"a photo of thing number {i}" for i in range(6)]


def _coco(path: Path, captions: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": [], "annotations": [
        {"id": i, "image_id": 100 + i, "caption": c} for i, c in enumerate(captions)]}))


def _params(root: Path, method: str) -> None:
    params = yaml.safe_load((ROOT / "pipeline/presets/micro.yaml").read_text())
    params["prompts"] = {"train_sources": [{"kind": "coco", "path": "annotations/train.json"}],
                         "eval_source": {"kind": "coco",
                                         "path": "annotations/captions_val2017.json"},
                         "max_eval": 6}
    params["cache"]["pairs"].update(count=4, batch_size=4, shard_size=4)
    params["reference"] = {"images": "val2017", "protocol": "coco2017_5k", "batch_size": 4}
    params["distill"].update(method=method, sample_prompts=2, proxy_fid_images=0,
                             monitor={"action": "off"})
    params["distill"]["loop"].update(steps=2, batch_size=2, sample_every=2, checkpoint_every=2)
    params["evaluate"] = {
        "protocol": "coco2017_5k", "captions": "annotations/captions_val2017.json",
        "num_images": 4, "teacher_steps": 2, "teacher_guidance_scale": 4.0,
        "curve_guidance_scales": [], "scorer": "models/scorer", "batch_size": 4,
        "grid_images": 2, "latency_repeats": 1, "latency_warmup": 0, "kid": False,
        "precision_recall": False}
    params["register"]["model_name"] = "flow-student"
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def _project(root: Path, teacher) -> Path:
    """A project on the tiny flow pipeline ``teacher``, its stages before distill run."""
    _coco(root / "annotations/train.json", TRAIN)
    _coco(root / "annotations/captions_val2017.json", EVAL)
    (root / "val2017").mkdir()
    for i, image in enumerate(photos(6, seed=20)):
        image.save(root / "val2017" / f"{i:012d}.jpg", quality=95)
    teacher.save_pretrained(root / paths.TEACHER, safe_serialization=True)
    _random_scorer(root / "models/scorer")
    _params(root, "instaflow")
    for stage in (prepare_prompts, cache_teacher, reference_stats):
        stage.run(root)
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return _project(tmp_path_factory.mktemp("flow-project"), tiny_sd3_pipeline(0, t5=True))


@pytest.fixture(scope="module")
def sana_project(tmp_path_factory) -> Path:
    return _project(tmp_path_factory.mktemp("sana-project"), tiny_sana_pipeline(0))


def _distill_evaluate_register(root: Path, method: str) -> dict:
    _params(root, method)
    for stage in (distill, evaluate, register_stage):
        stage.run(root)
    return json.loads((root / paths.REGISTER_OUT).read_text())


def _check_dag(project: Path, method: str, pipeline: str) -> None:
    """Distil, evaluate and register on ``project``; the student is a ``pipeline`` folder that
    the stock class reproduces, and the registered pyfunc generates what it does."""
    import mlflow

    result = _distill_evaluate_register(project, method)
    student = project / paths.STUDENT
    meta = json.loads((student / "student.json").read_text())
    assert meta["method"] == method and meta["diffusers"]["reproduces_student"] is True
    assert "from_pretrained" not in meta["diffusers"]  # nothing to pass: a plain folder
    assert json.loads((student / "model_index.json").read_text())["_class_name"] == pipeline
    prompts, seeds = EVAL[:2], [0, 1]
    ours = load_student(student).generate(prompts, seeds)
    stock = stock_images(student, prompts, seeds, pipeline=pipeline)
    assert np.abs(ours.astype(int) - stock.astype(int)).max() <= 1
    metrics = json.loads((project / paths.EVAL_METRICS).read_text())
    assert all(np.isfinite(metrics[k]["fid"]) for k in ("student", "teacher", "teacher_1step"))
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    try:
        model = mlflow.pyfunc.load_model(f"models:/flow-student/{result['version']}")
    finally:
        mlflow.set_tracking_uri(None)
    assert np.array_equal(model.predict(prompts), ours)


@pytest.mark.parametrize("method", ["instaflow", "swiftbrush"])
def test_the_dag_runs_on_an_sd3_teacher(project, method):
    _check_dag(project, method, "StableDiffusion3Pipeline")


def test_the_dag_runs_on_a_sana_teacher(sana_project):
    """SANA's Gemma sequence and its attention mask go through the cache, the distill loop and
    evaluation; the student folder is a SanaPipeline with the Euler twin of its scheduler."""
    from components.embed_cache import EmbeddingCache

    cache = EmbeddingCache(sana_project / paths.CACHE)
    assert cache.conditioning([0]).mask is not None and cache.null().mask.sum() == 1
    _check_dag(sana_project, "swiftbrush", "SanaPipeline")


def test_a_method_that_cannot_apply_fails_at_config_load(project, tmp_path):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["distill"]["method"] = "meng"
    params["distill"]["methods"]["meng"]["stage1_fraction"] = 0.0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "models").mkdir()
    (tmp_path / "models/teacher").symlink_to(project / paths.TEACHER)
    with pytest.raises(ConfigError, match="does not apply to the sd3 teacher .*only a "
                                          "guidance-distilled teacher"):
        load_all(tmp_path)
    index = json.loads((project / paths.TEACHER / "model_index.json").read_text())
    (tmp_path / "models/teacher").unlink()
    (tmp_path / "models/teacher").mkdir()
    (tmp_path / "models/teacher/model_index.json").write_text(json.dumps(
        {**index, "_class_name": "KandinskyPipeline"}))
    with pytest.raises(ConfigError, match="KandinskyPipeline.*supported teacher pipelines: "
                                          "StableDiffusionPipeline"):
        load_all(tmp_path)
