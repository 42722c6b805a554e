"""Choosing a run's preset, teacher, method and overrides: params.yaml is rewritten only when the
result is valid, and a new teacher gets its own registered model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from components.config import ConfigError
from pipeline.configure import configure_params, model_name_for, parse_override, preset_names
from tests.projects import ROOT, git


@pytest.fixture
def project(tmp_path) -> Path:
    """params.yaml (the default preset, committed) and the preset files, in a git repo."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(ROOT / "pipeline" / "presets", tmp_path / "pipeline" / "presets")
    git("init", "-q", cwd=tmp_path)
    git("add", "-A", cwd=tmp_path)
    git("commit", "-qm", "default", cwd=tmp_path)
    return tmp_path


def params(root: Path) -> dict:
    return yaml.safe_load((root / "params.yaml").read_text())


def test_preset_file_is_copied_verbatim(project):
    assert preset_names(project) == ["default", "gpu", "micro", "sd15", "sd21", "sdxl"]
    assert configure_params(project, preset="micro") == {}
    assert (project / "params.yaml").read_text() == (
        ROOT / "pipeline" / "presets" / "micro.yaml").read_text()


def test_default_preset_is_the_committed_params_file(project):
    configure_params(project, preset="micro")
    configure_params(project, preset="default")
    assert (project / "params.yaml").read_text() == (ROOT / "params.yaml").read_text()


def test_teacher_method_and_overrides(project):
    changes = configure_params(project, preset="micro", teacher="/models/sd-turbo/",
                               method="swiftbrush", overrides=["distill.loop.steps=7",
                                                               "evaluate.num_images=8"])
    assert changes == {"teacher.model": "/models/sd-turbo/",
                       "register.model_name": "distillery-sd-turbo-student",
                       "distill.method": "swiftbrush", "distill.loop.steps": 7,
                       "evaluate.num_images": 8}
    data = params(project)
    assert data["teacher"]["model"] == "/models/sd-turbo/"
    assert data["register"]["model_name"] == "distillery-sd-turbo-student"
    assert data["distill"]["loop"]["steps"] == 7 and data["distill"]["loop"]["batch_size"] == 4
    assert (project / "params.yaml").read_text().startswith("# preset micro with teacher.model=")
    # the preset's own teacher keeps the preset's registered model
    assert configure_params(project, preset="micro", teacher="models/teacher") == {}


def test_override_of_the_model_name_wins(project):
    changes = configure_params(project, teacher="org/sd", overrides=["register.model_name=mine"])
    assert changes["register.model_name"] == "mine" and params(project)["register"][
        "model_name"] == "mine"


@pytest.mark.parametrize("kwargs, message", [
    ({"preset": "nano"}, "unknown preset 'nano'; valid presets are: default, gpu, micro, sd15"),
    ({"method": "dmd9"}, "unknown method 'dmd9'; valid methods are: dmd2, instaflow, meng, sid_lsg, swiftbrush"),
    ({"overrides": ["distill.loop.stepz=3"]}, "valid keys are"),
    ({"overrides": ["steps=3"]}, "must look like section.key=value"),
    ({"overrides": ["teacher.model.name=x"]}, "'model' is not a section"),
])
def test_bad_choice_leaves_params_untouched(project, kwargs, message):
    before = (project / "params.yaml").read_text()
    with pytest.raises(ConfigError, match=message):
        configure_params(project, **kwargs)
    assert (project / "params.yaml").read_text() == before


def test_default_preset_needs_git(tmp_path):
    (tmp_path / "params.yaml").write_text("{}")
    with pytest.raises(ConfigError, match="committed at git's HEAD"):
        configure_params(tmp_path, preset="default")


def test_helpers():
    assert parse_override("distill.loop.steps=300") == ("distill.loop.steps", 300)
    assert parse_override("teacher.model=org/x") == ("teacher.model", "org/x")
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert model_name_for("stable-diffusion-v1-5/stable-diffusion-v1-5") == (
        "distillery-stable-diffusion-v1-5-student")
    assert model_name_for("models/teacher") == "distillery-teacher-student"
