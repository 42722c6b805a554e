"""A student in the formats other tools load: a diffusers folder, a LoRA file, and a single-file
checkpoint in the original layout: the whole SD1.x / SDXL pipeline (ComfyUI, A1111;
``components.ldm_layout``), or an SD3 / FLUX / SANA student's transformer alone
(``components.flow_layout``).

Each writer reads a student folder (``components.generation.save_student``) and writes one file
or folder atomically; ``python -m pipeline.export`` is the command.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from components.generation import STUDENT_FILE, precision_dtype
from components.io import atomic_dir
from components.student import LORA_FILE, LORA_FOLDER

FORMATS = ("diffusers", "lora", "single-file")


def _meta(student: Path) -> dict:
    path = student / STUDENT_FILE
    if not path.exists():
        raise FileNotFoundError(f"{student} is not a Distillery student (no {STUDENT_FILE}); "
                                "produce one with the distill stage (`dvc repro distill`)")
    return json.loads(path.read_text(encoding="utf-8"))


def _pipeline(student: Path):
    from diffusers import DiffusionPipeline

    from components.teacher import absent_parts

    return DiffusionPipeline.from_pretrained(student, dtype=torch.float32,
                                             **absent_parts(student))


def export_diffusers(student: Path, out: Path) -> Path:
    """The full-weight diffusers pipeline folder (a LoRA student's fused weights), loaded and
    saved again by diffusers, with ``student.json`` (the call that reproduces the student)."""
    _meta(student)
    with atomic_dir(out) as tmp:
        _pipeline(student).save_pretrained(tmp, safe_serialization=True)
        shutil.copy2(student / STUDENT_FILE, tmp / STUDENT_FILE)
    return out


def export_lora(student: Path, out: Path) -> Path:
    """A LoRA student's diffusers LoRA file (``pipe.load_lora_weights(out)`` on the teacher)."""
    entry = _meta(student).get("student") or {"kind": "full"}
    if entry["kind"] != "lora":
        raise ValueError(f"{student} is a full student: it has no LoRA to export; train one with "
                         "`distill.student: {kind: lora}` or export diffusers / single-file")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.copy2(student / LORA_FOLDER / LORA_FILE, tmp)
    tmp.replace(out)
    return out


def export_single_file(student: Path, out: Path, precision: str = "fp16") -> Path:
    """One safetensors checkpoint in the original layout, its tensors in ``precision`` (fp16, as
    the published checkpoints; bf16; fp32). A UNet student's file holds the whole pipeline (UNet,
    VAE, text encoders); an SD3, FLUX or SANA student's holds the transformer only, in its
    family's released layout (ComfyUI's "Load Diffusion Model"; diffusers'
    ``<Transformer>.from_single_file(out, config=student, subfolder="transformer")``)."""
    from safetensors.torch import save_file

    from components.flow_layout import transformer_to_original
    from components.ldm_layout import pipeline_to_ldm
    from components.networks import PIPELINES, is_flow

    dtype = torch.float16 if precision == "fp16" else precision_dtype(precision)
    _meta(student)
    pipe = _pipeline(student)
    if is_flow(pipe):
        state = transformer_to_original(PIPELINES[type(pipe).__name__], pipe.transformer)
    else:
        state = pipeline_to_ldm(pipe)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(out)
    return out
