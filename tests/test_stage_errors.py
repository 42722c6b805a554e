"""Bad input to a stage: one clear line naming the problem and the fix, exit code 2, and no
half-written output left behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.io import atomic_dir
from tests.tiny import build_tiny_teacher

ROOT = Path(__file__).resolve().parents[1]


def _stage(name: str, root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"pipeline.stages.{name}", "--root", str(root)],
                          check=False, capture_output=True, text=True, cwd=ROOT)


def _params(root: Path, edit=None) -> Path:
    data = yaml.safe_load((ROOT / "pipeline/presets/micro.yaml").read_text())
    if edit:
        edit(data)
    (root / "params.yaml").write_text(yaml.safe_dump(data))
    return root


def _last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


def test_missing_teacher_folder(tmp_path):
    root = _params(tmp_path, lambda d: d["teacher"].update(model="models/nope"))
    proc = _stage("cache_teacher", root)
    assert proc.returncode == 2
    line = _last_line(proc)
    assert "teacher folder 'models/nope' does not exist" in line
    assert "dvc repro bootstrap" in line and "hub id" in line
    assert not (tmp_path / "data").exists()


def test_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "models/teacher").mkdir(parents=True)
    proc = _stage("cache_teacher", _params(tmp_path))
    assert proc.returncode == 2
    assert "not a diffusers pipeline folder (no model_index.json)" in _last_line(proc)


def test_missing_upstream_output_names_the_stage(tmp_path):
    build_tiny_teacher(tmp_path / "models/teacher")
    proc = _stage("cache_teacher", _params(tmp_path))
    assert proc.returncode == 2
    assert "data/prompts/train.txt does not exist" in _last_line(proc)
    assert "run `dvc repro prepare_prompts` first" in _last_line(proc)
    assert not (tmp_path / "data/cache").exists()


def test_unknown_params_key_and_wrong_type(tmp_path):
    proc = _stage("prepare_prompts", _params(tmp_path, lambda d: d["prompts"].update(maxeval=3)))
    assert proc.returncode == 2
    assert "prompts: unknown key(s) 'maxeval'; valid keys are:" in _last_line(proc)
    proc = _stage("distill", _params(tmp_path, lambda d: d["distill"]["loop"].update(steps="x")))
    assert proc.returncode == 2
    assert "distill.loop.steps: expected an integer, got 'x'" in _last_line(proc)


def test_empty_prompts_file_leaves_previous_output_untouched(tmp_path):
    (tmp_path / "prompts.txt").write_text("\n\n")
    (tmp_path / "data/prompts").mkdir(parents=True)
    (tmp_path / "data/prompts/train.txt").write_text("kept\n")
    root = _params(tmp_path, lambda d: d["prompts"].update(
        train_sources=[{"kind": "text", "path": "prompts.txt"}]))
    proc = _stage("prepare_prompts", root)
    assert proc.returncode == 2
    assert "prompts.txt' is empty" in _last_line(proc)
    assert (tmp_path / "data/prompts/train.txt").read_text() == "kept\n"


def test_atomic_dir_keeps_the_old_folder_on_failure(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out/a").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("new")
        raise RuntimeError("killed")
    assert (tmp_path / "out/a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "b").write_text("new")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b"]


def test_corrupt_cache_shard_is_one_line_without_traceback(tmp_path):
    import torch

    from components.embed_cache import CacheConfig, write_cache
    from components.io import write_json
    from components.teacher import TextConditioning

    prompts = ["a red circle", "a blue square", "a green triangle"]
    encode = lambda ps: TextConditioning(torch.ones(len(ps), 3, 2))
    index = write_cache(tmp_path / "data/cache", prompts, encode, CacheConfig(shard_size=2), "t",
                        log=lambda _: None)
    write_json(tmp_path / "data/prompts/manifest.json", {"train_sha256": index["prompts_sha256"]})
    shard = tmp_path / "data/cache/shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    proc = _stage("distill", _params(tmp_path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [_last_line(proc)]
    assert "shard-00001.safetensors is missing or corrupt" in _last_line(proc)
    assert _last_line(proc).startswith("distill: error: ")


def test_zero_cadence_is_rejected_before_training(tmp_path, key="checkpoint_every"):
    proc = _stage("distill", _params(tmp_path, lambda d: d["distill"]["loop"].update({key: 0})))
    assert proc.returncode == 2
    assert _last_line(proc) == f"distill: error: distill.loop: {key} must be at least 1, got 0"


# Raised by the flow to Prefect (its stage's own error is the one the user reads), not by a stage.
# the flow's wrapper, and the meta-kernel cache's internal signal (caught where raised)
NOT_STAGE_ERRORS = {"pipeline.flows.StageFailed", "components.planning.meta_cache._Uncacheable"}


def _project_exception_classes() -> list[str]:
    """``module.Class`` of every class in components/ and pipeline/ deriving from an exception
    (by name: a base ending in Error, Exception, Missing, Alarm or Unavailable)."""
    import ast

    found = []
    for path in sorted([*(ROOT / "components").rglob("*.py"), *(ROOT / "pipeline").rglob("*.py")]):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            bases = [getattr(b, "id", getattr(b, "attr", "")) for b in getattr(node, "bases", [])]
            if isinstance(node, ast.ClassDef) and any(
                    b.endswith(("Error", "Exception", "Missing", "Alarm", "Unavailable"))
                    for b in bases):
                found.append(f"{module}.{node.name}")
    return found


def test_every_project_error_type_reaches_the_user_as_one_line():
    """Each exception class the project defines is one the stage entry turns into one line
    (a checkpoint of another run used to end in a traceback: CheckpointError was a bare
    RuntimeError, and so was InstaFlow's missing LPIPS backbone)."""
    import importlib

    from pipeline.stages.common import PROJECT_ERRORS

    classes = [c for c in _project_exception_classes() if c not in NOT_STAGE_ERRORS]
    assert "components.checkpoint.CheckpointError" in classes  # the walk finds them
    for qualified in classes:
        module, name = qualified.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, PROJECT_ERRORS), f"{qualified} would end in a traceback"


def test_checkpoint_of_another_run_is_one_line(tmp_path, monkeypatch, capsys):
    from components.checkpoint import CheckpointError
    from pipeline.stages.common import entry

    def run(root):
        raise CheckpointError(f"checkpoint {root}/step-1 does not match this run: missing "
                              "['model/student/w'] (1), unexpected [] (0); delete it to start "
                              "afresh")

    monkeypatch.setattr(sys, "argv", ["distill", "--root", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        entry(run, "distill")
    assert exit_.value.code == 2
    line = (f"distill: error: checkpoint {tmp_path.resolve()}/step-1 does not match this run: "
            "missing ['model/student/w'] (1), unexpected [] (0); delete it to start afresh")
    assert capsys.readouterr().err.strip().splitlines() == [line]


def test_missing_reference_folder_gets_the_stages_own_line(tmp_path, monkeypatch, capsys):
    """Run directly (or by the flow), reference_stats names the key to set; under a bare
    `dvc repro` DVC stops first on the missing dependency, which `pipeline.params --check`
    names (tests/test_config.py)."""
    from pipeline.stages import reference_stats

    _params(tmp_path, lambda d: d["reference"].update({"images": "data/coco/val2014"}))
    monkeypatch.setattr(sys, "argv", ["reference_stats", "--root", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        reference_stats.main()
    assert exit_.value.code == 2
    line = (f"reference_stats: error: reference image folder {tmp_path.resolve()}/data/coco/"
            "val2014 not found; set `reference.images` to a folder of images (e.g. COCO val2014)")
    assert capsys.readouterr().err.strip().splitlines() == [line]


def test_a_corrupt_cache_index_names_its_file(tmp_path):
    """An index.json that is not JSON is a CacheError naming the file and how to rebuild it
    (as a corrupt shard is), for the embedding cache and the pair cache alike."""
    from components.embed_cache import EmbeddingCache
    from components.io import CacheError
    from components.pair_cache import PairCache

    for name in ("cache", "pairs"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "index.json").write_text("{garbage")
    for reader, name in ((EmbeddingCache, "cache"), (PairCache, "pairs")):
        with pytest.raises(CacheError, match=rf"cache index .*{name}/index\.json is corrupt.*"
                                             r"dvc repro cache_teacher --force"):
            reader(tmp_path / name)
