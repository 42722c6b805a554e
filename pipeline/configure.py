"""Choose what a run distills: a preset, a teacher, a method and single ``key=value`` overrides,
written into ``params.yaml`` before the stages run (what ``dvc exp run -S`` does).

The new params are validated before anything is written, so a bad choice leaves ``params.yaml``
as it was and fails with the valid names::

    uv run python -m pipeline.configure --preset sd15 --method dmd2 --set distill.loop.steps=500

The recipe presets (sd15, sd21, sdxl) also bring the chosen method's loop and pair settings
(``pipeline.recipes``).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from components.config import ConfigError
from components.io import atomic_write_text
from pipeline.params import PARAMS_FILE, load_all
from pipeline.recipes import get_dotted, method_settings, set_dotted

PRESETS_DIR = Path("pipeline/presets")
DEFAULT_PRESET = "default"  # the params.yaml committed at HEAD


def preset_names(root: Path) -> list[str]:
    return [DEFAULT_PRESET, *sorted(p.stem for p in (root / PRESETS_DIR).glob("*.yaml"))]


def preset_text(root: Path, name: str) -> str:
    """The params file of preset ``name``: ``pipeline/presets/<name>.yaml``, or for ``default``
    the ``params.yaml`` of git's HEAD (not the workspace's, which earlier runs may have changed)."""
    if name == DEFAULT_PRESET:
        try:
            return subprocess.run(["git", "show", f"HEAD:{PARAMS_FILE}"], cwd=root, check=True,
                                  capture_output=True, text=True).stdout
        except (subprocess.CalledProcessError, FileNotFoundError):
            raise ConfigError(f"preset {DEFAULT_PRESET!r} is the {PARAMS_FILE} committed at git's "
                              f"HEAD, and {root} has none; commit it or name another preset: "
                              f"{', '.join(preset_names(root)[1:])}") from None
    path = root / PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; valid presets are: "
                          f"{', '.join(preset_names(root))}")
    return path.read_text(encoding="utf-8")


def model_name_for(teacher: str) -> str:
    """The registered model of a teacher's students: ``distillery-<teacher slug>-student``."""
    slug = re.sub(r"[^a-z0-9.]+", "-", teacher.lower().rstrip("/").rsplit("/", 1)[-1]).strip("-.")
    return f"distillery-{slug or 'teacher'}-student"


def parse_override(item: str) -> tuple[str, Any]:
    """``"distill.loop.steps=300"`` → ``("distill.loop.steps", 300)`` (the value read as YAML)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip() or "." not in key:
        raise ConfigError(f"override {item!r} must look like section.key=value, "
                          "e.g. distill.loop.steps=300")
    return key.strip(), yaml.safe_load(value)


def render_params(root: Path, preset: str | None = None, teacher: str | None = None,
                  method: str | None = None, overrides: Sequence[str] = ()
                  ) -> tuple[str, dict[str, Any]]:
    """The validated text of ``params.yaml`` from ``preset`` (default: the current file) with the
    changes applied, and the changes (dotted key -> value); nothing is written.

    A new ``teacher`` also selects that teacher's registered model (``model_name_for``) unless an
    override names ``register.model_name``: one registered model per teacher. With a recipe
    preset (sd15, sd21, sdxl) the chosen method also brings its loop and pair settings
    (``pipeline.recipes``); overrides still win.
    """
    root = Path(root)
    base = preset_text(root, preset) if preset else (root / PARAMS_FILE).read_text("utf-8")
    data = yaml.safe_load(base) or {}
    changes: dict[str, Any] = {}
    if teacher and teacher != data.get("teacher", {}).get("model"):
        changes["teacher.model"] = teacher
        changes["register.model_name"] = model_name_for(teacher)
    if method:
        changes["distill.method"] = method
    if preset:
        chosen = method or get_dotted(data, "distill.method")
        changes.update((k, v) for k, v in method_settings(root / PRESETS_DIR, preset,
                                                          chosen).items()
                       if get_dotted(data, k) != v)
    changes.update(parse_override(item) for item in overrides)
    for key, value in changes.items():
        set_dotted(data, key, value)
    text = base if not changes else _render(data, preset, changes)
    with tempfile.TemporaryDirectory() as tmp:  # validate before anything is written
        (Path(tmp) / PARAMS_FILE).write_text(text, encoding="utf-8")
        load_all(tmp)
    return text, changes


def configure_params(root: Path, preset: str | None = None, teacher: str | None = None,
                     method: str | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Write ``root/params.yaml`` as ``render_params`` makes it; returns the changes. A bad
    choice fails before anything is written."""
    text, changes = render_params(root, preset, teacher, method, overrides)
    atomic_write_text(Path(root) / PARAMS_FILE, text)
    return changes


def _render(data: dict, preset: str | None, changes: dict[str, Any]) -> str:
    head = (f"# preset {preset or '(workspace params)'} with "
            + ", ".join(f"{k}={v!r}" for k, v in changes.items()) + "\n")
    return head + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.configure",
        description="Write params.yaml from a preset, teacher, method and overrides.")
    parser.add_argument("--root", type=Path, default=Path("."), help="project root")
    parser.add_argument("--preset", help="default (the committed params.yaml) or a file of "
                        "pipeline/presets/: micro, gpu, and the published recipes sd15, sd21, "
                        "sdxl (these also bring the chosen method's loop and pair settings)")
    parser.add_argument("--teacher", help="teacher folder or hub id (teacher.model)")
    parser.add_argument("--method", help="distillation method (distill.method)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one param, like `dvc exp run -S` (repeatable)")
    args = parser.parse_args(argv)
    try:
        changes = configure_params(args.root, args.preset, args.teacher, args.method, args.set)
    except ConfigError as err:
        print(f"configure: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    summary = ", ".join(f"{k}={v!r}" for k, v in changes.items()) or "no changes"
    print(f"{args.root / PARAMS_FILE}: preset {args.preset or '(as it was)'}; {summary}")


if __name__ == "__main__":
    main()
