"""The published-recipe presets (sd15, sd21, sdxl): they load strictly for every method, carry
teacher pairs only for the methods that train on them, are accepted by ``pipeline.configure``
and the nightly deployment, and a real SD teacher trained with the world's settings warns once."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.architectures import ARCHS, DIVISORS, build_pipeline, identify, unet_config
from components.config import ConfigError
from components.methods import method_names
from components.methods.dmd2 import DMD2
from components.methods.instaflow import InstaFlow
from components.methods.meng import MengGuidedDistillation
from components.methods.sid_lsg import SiDLSG
from components.methods.swiftbrush import SwiftBrush
from components.teacher import TeacherConfig
from pipeline import configure, deploy
from pipeline.params import load_all
from pipeline.recipes import (
    PRESETS,
    RECIPE_PRESETS,
    get_dotted,
    method_settings,
    recipe_warning,
    teacher_unet_config,
)
from tests.projects import ROOT, git
from tests.tiny import build_tiny_teacher

CLASSES = {"swiftbrush": SwiftBrush, "sid_lsg": SiDLSG, "dmd2": DMD2, "instaflow": InstaFlow,
           "meng": MengGuidedDistillation}
PRECISION = {"swiftbrush": "fp32", "sid_lsg": "fp32", "dmd2": "bf16", "instaflow": "bf16",
             "meng": "bf16"}
HUB_IDS = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
           "sd21": "stabilityai/stable-diffusion-2-1-base",
           "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}


@pytest.fixture
def project(tmp_path) -> Path:
    """params.yaml (the default preset, committed) and the preset files, in a git repo."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(ROOT / "pipeline" / "presets", tmp_path / "pipeline" / "presets")
    git("init", "-q", cwd=tmp_path)
    git("add", "-A", cwd=tmp_path)
    git("commit", "-qm", "default", cwd=tmp_path)
    return tmp_path


def configured(project: Path, preset: str, method: str | None = None, **kw) -> dict:
    configure.configure_params(project, preset=preset, method=method, **kw)
    return load_all(project)


def test_every_method_has_a_class_and_settings_in_every_recipe():
    assert sorted(CLASSES) == method_names()
    for preset in RECIPE_PRESETS:
        table = yaml.safe_load((PRESETS / "methods" / f"{preset}.yaml").read_text())
        assert sorted(table) == method_names(), preset


class _UniqueKeys(yaml.SafeLoader):
    """YAML keeps the last of two equal keys silently: a preset must not have any."""


def _mapping(loader, node, deep=False):
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    assert len(keys) == len(set(keys)), f"duplicate keys in {keys}"
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


@pytest.mark.parametrize("path", [*(PRESETS / f"{p}.yaml" for p in RECIPE_PRESETS),
                                  *(PRESETS / "methods" / f"{p}.yaml" for p in RECIPE_PRESETS)],
                         ids=lambda p: p.relative_to(PRESETS).as_posix())
def test_no_key_is_written_twice(path):
    yaml.load(path.read_text(), _UniqueKeys)  # a SafeLoader: no objects built


@pytest.mark.parametrize("preset", sorted(RECIPE_PRESETS))
@pytest.mark.parametrize("method", method_names())
def test_recipe_loads_for_every_method_with_pairs_only_for_pair_methods(project, preset, method):
    configs = configured(project, preset, method)
    distill, pairs = configs["distill"], configs["cache"].pairs
    assert distill.method == method and distill.device == "cuda"
    assert configs["teacher"].model == HUB_IDS[preset]
    assert configs["evaluate"].device == "cuda"
    assert configs["evaluate"].protocol == configs["reference"].protocol == "coco2014_30k"
    assert (pairs.count > 0) == CLASSES[method].needs_pairs, (preset, method, pairs.count)
    # the global batch splits into whole micro-batches on one GPU
    assert distill.loop.batch_size % distill.loop.grad_accum == 0
    distill.method_config()  # every method section loads strictly into its config class
    assert distill.policy.precision == PRECISION[method]  # the published precision
    assert recipe_warning(_unet(preset), distill, HUB_IDS[preset]) is None


@pytest.mark.parametrize("preset", sorted(RECIPE_PRESETS))
def test_preset_file_holds_its_own_methods_settings(project, preset):
    """`--preset sd15` alone and `--preset sd15 --method <its method>` give the same file."""
    data = yaml.safe_load((PRESETS / f"{preset}.yaml").read_text())
    own = data["distill"]["method"]
    assert all(get_dotted(data, k) == v for k, v in method_settings(PRESETS, preset,
                                                                      own).items())
    assert configure.configure_params(project, preset=preset) == {}
    assert configure.configure_params(project, preset=preset, method=own) == {
        "distill.method": own}
    assert (project / "params.yaml").read_text().endswith(
        yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100))


def test_choosing_a_method_brings_its_loop_and_pairs_and_overrides_win(project):
    changes = configure.configure_params(project, preset="sd15", method="dmd2",
                                         overrides=["distill.loop.steps=10"])
    assert changes["distill.loop.batch_size"] == 2048 and changes["distill.loop.steps"] == 10
    configs = load_all(project)
    assert configs["distill"].loop.steps == 10 and configs["cache"].pairs.count == 0
    configs = configured(project, "sd15", "instaflow")
    assert configs["cache"].pairs.count == 1_600_000 and configs["distill"].loop.batch_size == 1024
    # presets without per-method settings are unchanged by a method choice
    assert configure.configure_params(project, preset="micro", method="dmd2") == {
        "distill.method": "dmd2"}


def _unet(arch: str) -> dict:
    return unet_config(arch, 8)


def test_identify_the_families_at_every_width():
    for arch in ARCHS:
        for divisor in DIVISORS:
            assert identify(unet_config(arch, divisor)) == arch
    assert identify({**unet_config("sd15"), "cross_attention_dim": 1024}) is None


@pytest.fixture(scope="module")
def sd15_teacher(tmp_path_factory) -> Path:
    """A random-weight SD1.5-architecture pipeline folder (widths / 8)."""
    folder = tmp_path_factory.mktemp("sd15") / "teacher"
    build_pipeline("sd15", divisor=8).save_pretrained(folder, safe_serialization=True)
    return folder


def test_world_settings_on_an_sd15_teacher_warn_once_naming_the_preset(sd15_teacher, project):
    unet = teacher_unet_config(TeacherConfig(str(sd15_teacher)), project)
    world = load_all(ROOT)["distill"]  # params.yaml: the miniature world's settings
    line = recipe_warning(unet, world, str(sd15_teacher))
    assert line is not None and "\n" not in line
    assert "SD1.5 UNet" in line and f"--preset sd15 --method {world.method}" in line
    assert "(published 1e-06)" in line and "global batch 32 (published 512)" in line
    for method in method_names():
        assert recipe_warning(unet, configured(project, "sd15", method)["distill"],
                              str(sd15_teacher)) is None, method


def test_no_warning_for_other_teachers(tmp_path):
    world = load_all(ROOT)["distill"]
    tiny = build_tiny_teacher(tmp_path / "tiny")
    assert recipe_warning(teacher_unet_config(TeacherConfig(str(tiny)), tmp_path), world,
                          "tiny") is None
    assert teacher_unet_config(TeacherConfig("models/nope"), tmp_path) is None
    assert recipe_warning(_unet("sdxl"), world, "x").count("--preset sdxl") == 1


def _distill_stage(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.stages.distill", "--root", str(root)],
                          check=False, capture_output=True, text=True, cwd=ROOT)


def test_distill_stage_prints_the_warning_first(sd15_teacher, project):
    configure.configure_params(project, preset="micro", teacher=str(sd15_teacher))
    proc = _distill_stage(project)
    warnings = [line for line in proc.stderr.splitlines() if "warning: the teacher is" in line]
    assert len(warnings) == 1 and "--preset sd15" in warnings[0], proc.stderr
    assert proc.returncode == 2 and "prepare_prompts" in proc.stderr.splitlines()[-1]


def test_configure_command_line(project, capsys):
    configure.main(["--root", str(project), "--preset", "sd21", "--method", "sid_lsg"])
    assert "distill.method='sid_lsg'" in capsys.readouterr().out
    assert load_all(project)["distill"].loop.batch_size == 512
    before = (project / "params.yaml").read_text()
    with pytest.raises(SystemExit) as exit_:
        configure.main(["--root", str(project), "--preset", "sd99"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "valid presets are: default, gpu, micro, sd15, sd21, sdxl" in err
    assert (project / "params.yaml").read_text() == before


def test_nightly_deployment_accepts_the_recipes_and_refuses_unknown_presets(project, capsys):
    dep = deploy.nightly(project, preset="sdxl", method="dmd2")
    assert dep.parameters["preset"] == "sdxl" and dep.parameters["method"] == "dmd2"
    with pytest.raises(ConfigError, match="unknown preset 'sd16'; valid presets are: .*sd15"):
        deploy.nightly(project, preset="sd16")
    with pytest.raises(SystemExit):
        deploy.main(["--root", str(project), "--preset", "sd16"])
    assert capsys.readouterr().err.startswith("deploy: error: unknown preset 'sd16'")
