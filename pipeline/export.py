"""Export a student for other tools: a diffusers folder, a LoRA file, a single-file checkpoint.

    uv run python -m pipeline.export --out exports                       # models/student
    uv run python -m pipeline.export --model models:/distillery-student@champion --out exports
    uv run python -m pipeline.export --student models/student --format single-file --out exports

Writes ``<out>/diffusers/`` (a full-weight diffusers pipeline folder), ``<out>/student_lora
.safetensors`` (a LoRA student's diffusers LoRA, for ``pipe.load_lora_weights``) and
``<out>/student.safetensors`` (SD1.x / SDXL original single-file layout: ComfyUI's checkpoint
loader, A1111's ``models/Stable-diffusion``; diffusers' ``from_single_file``; for an SD3, FLUX or
SANA student the transformer alone in its released layout, for ComfyUI's "Load Diffusion Model").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from components.export import FORMATS, export_diffusers, export_lora, export_single_file
from pipeline import paths

DEFAULT_FORMATS = {"full": ("diffusers", "single-file"),
                   "lora": ("diffusers", "lora", "single-file")}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.export",
        description="Write a saved or registered student as a diffusers folder, a LoRA file "
                    "(LoRA students) and a single-file checkpoint in the original layout (ComfyUI, "
                    "A1111; an SD3/FLUX/SANA student's transformer alone).")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--student", type=Path, default=None,
                        help=f"a student folder (default: {paths.STUDENT} under --root)")
    source.add_argument("--model", default=None,
                        help="a registered student, e.g. models:/distillery-student@champion")
    parser.add_argument("--root", type=Path, default=Path("."), help="project root")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI for --model (default: the project's)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the exports to")
    parser.add_argument("--format", choices=FORMATS, action="append", dest="formats",
                        help="what to write (repeatable; default: every format the student has)")
    parser.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default="fp16",
                        help="tensor type of the single-file checkpoint (default fp16, as "
                             "published SD checkpoints)")
    return parser


def export(student: Path, out: Path, formats: tuple[str, ...] | None,
           precision: str = "fp16") -> dict[str, Path]:
    """Write ``formats`` (default: every format the student has) of ``student`` under ``out``."""
    meta = student / "student.json"
    kind = ((json.loads(meta.read_text()).get("student") or {}).get("kind", "full")
            if meta.exists() else "full")
    written = {}
    for fmt in formats or DEFAULT_FORMATS[kind]:
        if fmt == "diffusers":
            written[fmt] = export_diffusers(student, out / "diffusers")
        elif fmt == "lora":
            written[fmt] = export_lora(student, out / "student_lora.safetensors")
        else:
            written[fmt] = export_single_file(student, out / "student.safetensors", precision)
    return written


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            student = args.student or args.root / paths.STUDENT
            if args.model:
                from components.registry.lora import download_student
                from components.registry.store import tracking_uri

                uri = args.tracking_uri or tracking_uri(args.root)
                student = download_student(uri, args.model, Path(tmp))
            written = export(student, args.out, tuple(args.formats or ()) or None,
                             args.precision)
    except (FileNotFoundError, ValueError) as err:
        print(f"export: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    for fmt, path in written.items():
        print(f"export: {fmt}: {path}")


if __name__ == "__main__":
    main()
