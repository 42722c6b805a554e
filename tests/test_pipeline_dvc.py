"""Smoke test of the whole DAG on the micro preset, run for real by DVC in a temporary git repo,
and the README's reproduction in a second clone of it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.stages import STAGES
from tests.projects import GIT_IDENTITY, copy_project

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _run(args, cwd, check=True):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **GIT_IDENTITY,
           "MLFLOW_TRACKING_URI": ""}
    env.pop("MLFLOW_TRACKING_URI")  # the project's own sqlite store
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def _ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([a-z_]+)'", output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A copy of the project's files (as git sees them) with the micro preset as params.yaml."""
    dest = copy_project(tmp_path_factory.mktemp("project"))
    proc = _run([str(BIN / "dvc"), "repro"], dest)
    assert _ran_stages(proc.stdout) == set(STAGES), proc.stdout
    _run(["git", "add", "-A"], dest)
    _run(["git", "commit", "-qm", "repro"], dest)
    return dest


def test_repro_builds_every_artifact_and_a_champion(repo):
    card = json.loads((repo / "outputs/eval/eval_card.json").read_text())
    assert set(card) == {"student", "teacher", "teacher_1step", "teacher_curve", "latency",
                         "floors"}
    assert set(card["floors"]) == {"real_renders", "vae_reconstruction"}
    assert card["student"]["card"]["steps"] == 1 and card["teacher"]["card"]["steps"] == 2
    assert card["student"]["card"]["protocol"] == "world" and card["student"]["card"]["complete"]
    assert [p["guidance_scale"] for p in card["teacher_curve"]["points"]] == [2.0, 4.0]
    assert card["latency"]["teacher_steps"] == 2 and card["latency"]["student_ms"] > 0
    assert (repo / "outputs/eval/grid.png").stat().st_size > 0
    metrics = json.loads((repo / "metrics/eval.json").read_text())
    assert metrics["student"]["fid"] > 0 and "kid_mean" in metrics["student"]
    assert 0 <= metrics["student"]["precision"] <= 1
    # the judge is exact on ground-truth renders: the real-render floor follows every attribute
    assert metrics["real_renders"]["attribute_accuracy"]["all"] == 1.0
    assert metrics["real_renders"]["fid"] > 0 and "all" in metrics["student"]["attribute_accuracy"]
    for row in ("student", "teacher", "teacher_1step"):  # every number with its noise
        assert metrics[row]["fid_std"] > 0 and metrics[row]["clip_score_std"] > 0, row
        assert card[row]["metrics"]["fid_std"] == metrics[row]["fid_std"]
    assert card["student"]["card"]["uncertainty"]["method"].startswith("delete-half jackknife")
    assert all("fid_std" in p for p in card["teacher_curve"]["points"])
    assert (repo / "outputs/eval/samples.json").is_file()
    reg = json.loads((repo / "outputs/register.json").read_text())
    assert reg["version"] == "1" and reg["promoted"] and reg["champion"] == "1"
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    version = client.get_model_version_by_alias("distillery-world-student", "champion")
    assert str(version.version) == "1"
    page = (repo / "outputs/review/review.html").read_text()
    assert "<img " in page and "no champion yet" in page
    assert version.tags["review_page"].endswith("/review/review.html")
    shown = _run([str(BIN / "dvc"), "metrics", "show", "--json"], repo).stdout
    assert "fid" in shown


def test_second_repro_has_nothing_to_do(repo):
    proc = _run([str(BIN / "dvc"), "repro"], repo)
    assert _ran_stages(proc.stdout) == set(), proc.stdout
    assert json.loads(_run([str(BIN / "dvc"), "status", "--json"], repo).stdout) == {}


def test_distill_param_change_reruns_only_downstream_stages(repo):
    proc = _run([str(BIN / "dvc"), "exp", "run", "-S", "distill.loop.steps=3", "-n", "steps3"],
                repo)
    assert _ran_stages(proc.stdout) == {"distill", "evaluate", "register"}, proc.stdout
    shown = json.loads(_run([str(BIN / "dvc"), "exp", "show", "--json"], repo).stdout)
    assert "steps3" in json.dumps(shown)
    # version 2's review page shows it beside champion version 1, image for image
    page = (repo / "outputs/review/review.html").read_text()
    assert "champion version 1" in page and "champion v1" in page


def test_unknown_method_fails_with_the_valid_names(repo):
    proc = _run([str(BIN / "dvc"), "exp", "run", "-S", "distill.method=nope"], repo, check=False)
    assert proc.returncode != 0
    assert ("unknown method 'nope'; valid methods are: dmd2, instaflow, meng, sid_lsg, swiftbrush"
            in proc.stdout + proc.stderr)


@pytest.mark.parametrize("method", ["instaflow"])
def test_every_method_is_one_experiment_away(repo, method):
    """`dvc exp run -S distill.method=<m>` re-runs only the downstream stages, and `dvc exp show`
    lists the experiments side by side. The method is a params dependency of cache_teacher too
    (it makes teacher pairs only for pair methods), so a pair method is the case that re-runs the
    most; a score method's experiment is ``steps3`` above."""
    proc = _run([str(BIN / "dvc"), "exp", "run", "-S", f"distill.method={method}", "-n",
                 f"m-{method}"], repo)
    assert _ran_stages(proc.stdout) == {"cache_teacher", "distill", "evaluate", "register"}, \
        proc.stdout
    student = json.loads((repo / "models/student/student.json").read_text())
    assert student["method"] == method
    assert json.loads((repo / "metrics/eval.json").read_text())["student"]["fid"] > 0
    shown = json.dumps(json.loads(_run([str(BIN / "dvc"), "exp", "show", "--json"],
                                       repo).stdout))
    assert f"m-{method}" in shown


TIMED = {"metrics/distill.json", "checkpoints/distill"}  # wall seconds, clock.json: not compared


def _lock(text: str) -> dict:
    """Per stage of a ``dvc.lock``: its deps, params and outs as path -> hash, the timed outputs
    left out."""
    import yaml

    stages = yaml.safe_load(text)["stages"]
    return {name: {"deps": {d["path"]: d.get("md5") for d in stage.get("deps", [])},
                   "params": stage.get("params"),
                   "outs": {o["path"]: o.get("md5") for o in stage.get("outs", [])
                            if o["path"] not in TIMED}}
            for name, stage in stages.items()}


def test_a_second_clone_rederives_the_student_with_the_first_clones_lock(repo, tmp_path):
    """A clone at another path pulls the first clone's DVC cache, removes the checkpoints and
    re-derives the student (`dvc repro --force --single-item distill`): its ``dvc.lock`` holds
    the committed hashes (every input, the student, the distill outputs and plots that later
    stages read; only what is not cached and records a wall clock differs), `dvc status` is
    empty, and no saved file names a machine path."""
    lock = _lock(_run(["git", "show", "HEAD:dvc.lock"], repo).stdout)  # what was committed
    second = tmp_path / "elsewhere" / "deeper" / "second"
    second.parent.mkdir(parents=True)
    _run(["git", "clone", "-q", str(repo), str(second)], tmp_path)
    dvc = str(BIN / "dvc")
    _run([dvc, "remote", "add", "--local", "-d", "origin", str(repo / ".dvc" / "cache")], second)
    _run([dvc, "pull"], second)  # the student and every stage's inputs and outputs
    shutil.rmtree(second / "checkpoints", ignore_errors=True)
    _run([dvc, "repro", "--force", "--single-item", "distill"], second)

    assert json.loads(_run([dvc, "status", "--json"], second).stdout) == {}
    again = _lock((second / "dvc.lock").read_text())
    assert again == lock  # the first clone's hashes
    assert set(again["distill"]["outs"]) == {"models/student", "outputs/distill",
                                             "plots/distill_loss.csv", "plots/distill_fid.csv"}
    saved = [p for p in (second / "models/student").rglob("*.json")]
    saved += [p for p in (second / "outputs/distill").rglob("*.json")]
    assert saved and not [p for p in saved if str(tmp_path) in p.read_text()]
