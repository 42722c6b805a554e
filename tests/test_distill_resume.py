"""The distill stage on the micro preset, in a throwaway copy of the project: a longer run resumes
the shorter one (and says so), keeps the grids, loss and proxy-FID rows of every segment and
their wall time, and ends bit-identical to an uninterrupted run; other runs' checkpoints survive
a failed run and are pruned to ``distill.keep_runs`` only after a new checkpoint exists."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml

from components.io import sha256_tree
from pipeline import paths
from pipeline.stages import distill
from tests.projects import prepared_project
from tests.threads import one_thread  # noqa: F401

pytestmark = pytest.mark.slow


def _set(root: Path, **loop) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["distill"]["loop"].update(loop)
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def _runs(root: Path) -> set[str]:
    return {p.name for p in (root / paths.CHECKPOINTS).iterdir()}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = prepared_project(tmp_path_factory.mktemp("resume") / "project", tmp_path_factory)
    _set(root, steps=1, sample_every=1, checkpoint_every=1, log_every=1)
    return root


def _distill(root: Path, capsys) -> str:
    capsys.readouterr()
    distill.run(root)
    return capsys.readouterr().err


def test_longer_run_resumes_keeps_every_segment_and_matches_an_uninterrupted_one(project, capsys):
    assert "resuming" not in _distill(project, capsys)
    first = json.loads((project / paths.DISTILL_METRICS).read_text())
    one_step = sha256_tree(project / paths.STUDENT)
    (run,) = _runs(project)
    _set(project, steps=2)
    err = _distill(project, capsys)
    assert "resuming from step 1 of 2" in err
    assert _runs(project) == {run}  # the same run, extended
    grids = sorted(p.name for p in (project / paths.DISTILL_OUT / "samples").iterdir())
    assert grids == ["step-0000001.png", "step-0000002.png"]
    with open(project / paths.PROXY_FID_PLOT) as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2]
    with open(project / paths.LOSS_PLOT) as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2]
    metrics = json.loads((project / paths.DISTILL_METRICS).read_text())
    assert metrics["steps"] == 2 and metrics["wall_seconds"] > first["wall_seconds"]
    resumed = sha256_tree(project / paths.STUDENT)
    assert "resuming from step 2 of 2: already trained" in _distill(project, capsys)
    shutil.rmtree(project / paths.CHECKPOINTS)
    assert "resuming" not in _distill(project, capsys)
    assert sha256_tree(project / paths.STUDENT) == resumed
    _set(project, steps=1)  # shorter than the run's checkpoint: trained apart, not overtrained
    assert f"training 1 steps in {run}-steps1" in _distill(project, capsys)
    assert sha256_tree(project / paths.STUDENT) == one_step


def test_other_runs_survive_a_failed_run_and_are_pruned_after_a_checkpoint(project, capsys):
    before = _runs(project)
    (project / "refstats-away").mkdir()
    shutil.move(project / paths.REFSTATS, project / "refstats-away")
    _set(project, steps=1, seed=1)
    with pytest.raises(FileNotFoundError, match="reference_stats"):
        distill.run(project)  # fails before its first checkpoint: nothing deleted
    shutil.move(project / "refstats-away" / "refstats", project / paths.REFSTATS)
    assert before < _runs(project)
    (failed,) = _runs(project) - before
    _distill(project, capsys)  # the same run again, now with a checkpoint: keep_runs 2 prunes
    assert failed in _runs(project) and len(_runs(project)) == 2
    kept = _runs(project)
    _set(project, seed=2)
    err = _distill(project, capsys)
    assert "removed the checkpoints of older runs" in err
    (new,) = _runs(project) - kept
    assert _runs(project) == {new, failed}  # the most recently active other run stays
