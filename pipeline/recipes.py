"""The published-recipe presets (``sd15``, ``sd21``, ``sdxl``): each method's settings in the
sections all methods share, and the warning for a real teacher trained with another preset.

A preset file holds every method's own section, but the loop (global batch, accumulation, run
length, cadences) and the teacher pair cache are shared, so the file holds them for its own
``distill.method``; ``pipeline/presets/methods/<preset>.yaml`` holds them for each method, as
dotted keys that ``pipeline.configure`` applies when a method is chosen.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from components.architectures import identify
from components.config import ConfigError, from_dict
from components.methods import get_method, method_names
from components.teacher import TeacherConfig, resolve_model

PRESETS = Path(__file__).parent / "presets"  # the presets shipped with this code
RECIPE_PRESETS = {"sd15": "SD1.5", "sd21": "SD2.1", "sdxl": "SDXL"}  # architecture = preset
CONFIGURE = "uv run python -m pipeline.configure"


def method_settings(presets: Path, preset: str, method: str) -> dict[str, Any]:
    """``method``'s settings of ``preset`` in the shared sections (dotted key -> value); {} for
    a preset without per-method settings (default, micro, gpu)."""
    path = Path(presets) / "methods" / f"{preset}.yaml"
    if not path.is_file() or method not in method_names():  # the params loader names those
        return {}
    table = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if method not in table:
        raise ConfigError(f"{path} has no settings for method {method!r} (it has "
                          f"{', '.join(table)}); add its loop and pair settings there")
    return dict(table[method] or {})


def get_dotted(data: dict, dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[last] = value


def recipe(presets: Path, preset: str, method: str) -> dict[str, Any]:
    """The params of ``preset`` with ``method`` chosen (its per-method settings applied)."""
    data = yaml.safe_load((Path(presets) / f"{preset}.yaml").read_text(encoding="utf-8"))
    set_dotted(data, "distill.method", method)
    for key, value in method_settings(presets, preset, method).items():
        set_dotted(data, key, value)
    return data


def teacher_unet_config(teacher: TeacherConfig, root: Path) -> dict[str, Any] | None:
    """The teacher's UNet config (``unet/config.json`` only, no weights); None when it cannot be
    read here (the stage's own teacher loading then reports why)."""
    from diffusers import UNet2DConditionModel

    try:
        source = resolve_model(teacher.model, root)
        return dict(UNet2DConditionModel.load_config(source, subfolder="unet",
                                                     revision=teacher.revision))
    except (OSError, ValueError):
        return None


def recipe_warning(unet: dict[str, Any] | None, distill: Any, teacher: str,
                   presets: Path = PRESETS) -> str | None:
    """One line when the teacher is an SD1.5 / SD2.1 / SDXL UNet but the distill settings'
    learning rates or global batch are not that family's published recipe (e.g. the miniature
    world's, 50-100x the published learning rates); None otherwise."""
    arch = identify(unet) if unet else None
    if arch is None:
        return None
    expected = recipe(presets, arch, distill.method)["distill"]
    cfg_cls, _ = get_method(distill.method)
    published = from_dict(cfg_cls, expected["methods"].get(distill.method) or {}, arch)
    ours = distill.method_config()
    names = [f.name for f in dataclasses.fields(cfg_cls) if f.name == "lr" or
             f.name.endswith("_lr")]
    diffs = [f"{n} {getattr(ours, n):g} (published {getattr(published, n):g})" for n in names
             if getattr(ours, n) != getattr(published, n)]
    if distill.loop.batch_size != expected["loop"]["batch_size"]:
        diffs.append(f"global batch {distill.loop.batch_size} (published "
                     f"{expected['loop']['batch_size']})")
    if not diffs:
        return None
    return (f"distill: warning: the teacher is an {RECIPE_PRESETS[arch]} UNet but "
            f"{distill.method} runs with {', '.join(diffs)}: start from its published recipe, "
            f"`{CONFIGURE} --preset {arch} --method {distill.method} --teacher {teacher}`")
