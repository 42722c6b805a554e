"""Config loading and wiring: strict params, every shipped params file, dvc.yaml vs stages."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from components.config import ConfigError, from_dict
from pipeline.params import load_all, load_stage
from pipeline.recipes import get_dotted
from pipeline.stages import STAGE_SECTIONS

ROOT = Path(__file__).resolve().parents[1]
PARAMS_FILES = [ROOT / "params.yaml", *sorted((ROOT / "pipeline" / "presets").glob("*.yaml"))]


@dataclass(frozen=True)
class Inner:
    rate: float
    kind: Literal["a", "b"] = "a"


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner
    sizes: tuple[int, ...] = (1,)
    extra: int | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)


def test_from_dict_builds_nested_and_coerces():
    cfg = from_dict(Outer, {"name": "x", "inner": {"rate": 1}, "sizes": [2, 3]}, "outer")
    assert cfg == Outer("x", Inner(1.0), (2, 3))
    assert isinstance(cfg.inner.rate, float)


@pytest.mark.parametrize("data, message", [
    ({"name": "x", "inner": {"rate": 1}, "colour": 1},
     "unknown key(s) 'colour'; valid keys are: extra, inner, name, sizes, tags"),
    ({"inner": {"rate": 1}}, "missing key 'name'"),
    ({"name": 3, "inner": {"rate": 1}}, "outer.name: expected a string, got 3"),
    ({"name": "x", "inner": {"rate": "fast"}}, "outer.inner.rate: expected a number"),
    ({"name": "x", "inner": {"rate": 1, "kind": "c"}}, "expected one of 'a', 'b'"),
    ({"name": "x", "inner": {"rate": 1}, "sizes": [1, True]}, "outer.sizes[1]: expected an int"),
    ({"name": "x", "inner": {"rate": 1}, "extra": "no"}, "expected int or null"),
])
def test_from_dict_errors_name_the_problem(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, data, "outer")
    assert message in str(err.value)


@pytest.mark.parametrize("path", PARAMS_FILES, ids=lambda p: p.name)
def test_every_shipped_params_file_loads(path, tmp_path):
    shutil.copy(path, tmp_path / "params.yaml")
    configs = load_all(tmp_path)
    assert set(configs) == {s.split(".")[0] for sections in STAGE_SECTIONS.values()
                            for s in sections}


@pytest.mark.parametrize("path", PARAMS_FILES, ids=lambda p: p.name)
def test_every_shipped_params_file_has_what_dvc_tracks(path):
    """DVC refuses a stage whose listed parameter is absent from params.yaml, even where the
    config has a default (``cache.precision`` for distill), so every preset must spell it out."""
    data = yaml.safe_load(path.read_text())
    missing = [f"{name}: {key}" for name, sections in STAGE_SECTIONS.items()
               for key in sections if get_dotted(data, key) is None]
    assert not missing, f"{path.name} lacks parameters dvc.yaml tracks: {missing}"


def _params_copy(tmp_path, edit):
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(data)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    return tmp_path


def test_unknown_method_lists_valid_names(tmp_path):
    root = _params_copy(tmp_path, lambda d: d["distill"].update(method="consistency"))
    with pytest.raises(ConfigError, match="unknown method 'consistency'; valid methods are: "
                                          ".*swiftbrush"):
        load_stage(root, "distill")


def test_unknown_section_and_key_fail(tmp_path):
    root = _params_copy(tmp_path, lambda d: d.update(distil={}))
    with pytest.raises(ConfigError, match="unknown section.*'distil'.*valid sections"):
        load_all(root)
    root = _params_copy(tmp_path, lambda d: d["distill"]["loop"].update(stpes=3))
    with pytest.raises(ConfigError, match="distill.loop: unknown key.*'stpes'.*steps"):
        load_all(root)


def test_method_section_is_checked_against_its_config(tmp_path):
    root = _params_copy(tmp_path, lambda d: d["distill"]["methods"]["swiftbrush"].update(lr=1))
    # the nested section's error names its own place once, with no outer prefix before it
    with pytest.raises(ConfigError, match="^distill.methods.swiftbrush: unknown key.*'lr'"):
        load_all(root)


def test_dvc_yaml_matches_stage_sections_and_modules():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(dvc) == list(STAGE_SECTIONS)
    for name, stage in dvc.items():
        assert stage["cmd"] == f"python -m pipeline.stages.{name}"
        assert tuple(stage["params"]) == STAGE_SECTIONS[name], name
        assert f"pipeline/stages/{name}.py" in stage["deps"], name
        for dep in stage["deps"]:
            if dep.startswith(("components/", "pipeline/")):
                assert (ROOT / dep).exists(), f"{name}: dependency {dep} does not exist"


def test_stage_modules_read_only_their_sections():
    for name, sections in STAGE_SECTIONS.items():
        source = (ROOT / "pipeline" / "stages" / f"{name}.py").read_text()
        assert f'load_stage(root, "{name}")' in source, name
        assert "load_all(" not in source, f"{name} loads every section"
        read = re.findall(r'(?:configs|load_stage\(root, "\w+"\))\["(\w+)"\]', source)
        assert read and set(read) <= set(sections), f"{name} reads {read}, declares {sections}"


def test_params_check_cli_validates_every_section(tmp_path):
    import subprocess
    import sys

    def check(root):
        return subprocess.run([sys.executable, "-m", "pipeline.params", "--check", "--root",
                               str(root)], capture_output=True, text=True, cwd=ROOT, check=False)

    shutil.copy(ROOT / "pipeline/presets/micro.yaml", tmp_path / "params.yaml")
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")  # what the stages produce
    ok = check(tmp_path)
    assert ok.returncode == 0 and "valid (prompts, teacher, cache, distill" in ok.stdout
    text = (tmp_path / "params.yaml").read_text().replace("grid_images:", "grid_imagez:")
    (tmp_path / "params.yaml").write_text(text)
    bad = check(tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("params: error: evaluate: unknown key(s) 'grid_imagez'")


def test_params_check_names_a_missing_reference_folder(tmp_path):
    """Under `dvc repro` a missing `${reference.images}` gets only DVC's "No such file"; the
    check names the key and what to set it to."""
    from pipeline.params import input_errors

    shutil.copy(ROOT / "pipeline/presets/micro.yaml", tmp_path / "params.yaml")
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    assert input_errors(tmp_path, load_all(tmp_path)) == []  # all produced by stages
    text = (tmp_path / "params.yaml").read_text().replace(
        "images: data/world/reference/images", "images: data/coco/val2014")
    (tmp_path / "params.yaml").write_text(text)
    expected = ("reference.images: data/coco/val2014 does not exist and no stage produces it; "
                "set it to a folder of FID reference images (COCO: val2014/ or val2017/)")
    assert input_errors(tmp_path, load_all(tmp_path)) == [expected]
