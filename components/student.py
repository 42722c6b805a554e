"""The student's network: a full copy of the teacher, or the frozen teacher with LoRA adapters.

``params.yaml: distill.student: {kind: full | lora, rank, alpha, targets}``. A full student
trains every weight of its copy of the teacher. A LoRA student trains only rank-``rank`` adapters
(peft LoRA, scale ``alpha / rank``) on the layers whose names end with one of ``targets``, over a
frozen copy of the teacher. The defaults are those of DMD2's SDXL LoRA release (rank 64, α 8, on
the attention, feed-forward and resnet layers of the UNet).

A LoRA student is saved as a diffusers LoRA, ``lora/pytorch_lora_weights.safetensors`` in the
student folder (``pipe.load_lora_weights(folder / "lora")`` on the teacher gives the student
exactly), beside the full-weight folder of its merged weights (diffusers' own ``fuse_lora``), so
every tool that reads a full student reads a LoRA one too.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from components.adapters import add_lora

LORA_FOLDER = "lora"  # inside the student folder
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name for it
DMD2_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                     "ff.net.2", "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv",
                     "upsamplers.0.conv", "time_emb_proj")


@dataclass(frozen=True)
class StudentConfig:
    """``distill.student``: what the student trains (``full`` weights or a ``lora``)."""

    kind: Literal["full", "lora"] = "full"
    rank: int = 64
    alpha: float = 8.0
    targets: tuple[str, ...] = DMD2_LORA_TARGETS

    def validate(self) -> None:
        if self.rank < 1:
            raise ValueError(f"student.rank must be at least 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"student.alpha must be > 0 (the LoRA scale is alpha / rank), got "
                             f"{self.alpha}")
        if not self.targets or any(not t for t in self.targets):
            raise ValueError("student.targets must name at least one layer suffix (e.g. to_q, "
                             "to_k, to_v, to_out.0)")

    def describe(self) -> dict:
        """The ``student`` entry of ``student.json``."""
        if self.kind == "full":
            return {"kind": "full"}
        return {"kind": "lora", "rank": self.rank, "alpha": self.alpha,
                "targets": list(self.targets), "weights": f"{LORA_FOLDER}/{LORA_FILE}"}


def lora_module(network: torch.nn.Module) -> torch.nn.Module:
    """Where the adapters go: a ``Denoiser``'s diffusers UNet or flow transformer, else the
    network itself."""
    for name in ("unet", "transformer"):
        if isinstance(getattr(network, name, None), torch.nn.Module):
            return getattr(network, name)
    return network


def student_network(teacher: torch.nn.Module, cfg: StudentConfig) -> torch.nn.Module:
    """The student's trainable network, a copy of ``teacher``: all of it trains (``full``), or
    only LoRA adapters over the frozen copy (``lora``)."""
    net = copy.deepcopy(teacher).train()
    if cfg.kind == "full":
        return net.requires_grad_(True)
    net.requires_grad_(False)
    add_lora(lora_module(net), cfg.rank, cfg.alpha, cfg.targets)
    return net


def lora_state_dict(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The student's adapters in the peft layout diffusers saves and loads
    (``...attn1.to_q.lora_A.weight``, conv layers alike). Diffusers' older ``lora.down`` layout
    (``convert_state_dict_to_diffusers``) renames only the attention layers, and a file mixing
    the two loads without its attention adapters."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(lora_module(network))
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def lora_metadata(cfg: StudentConfig) -> dict[str, Any]:
    """The peft config diffusers stores with the weights, so loading rebuilds the same scale."""
    from peft import LoraConfig

    meta = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.targets)
                      ).to_dict()
    return json.loads(json.dumps(meta, default=sorted))  # sets (target_modules) as lists


def save_lora(pipe: Any, network: torch.nn.Module, cfg: StudentConfig, folder: Path) -> Path:
    """Write the student's adapters as a diffusers LoRA into ``folder``; returns the file."""
    from components.networks import network_component

    name = network_component(pipe)  # the UNet's or the flow transformer's adapters
    type(pipe).save_lora_weights(folder, **{f"{name}_lora_layers": lora_state_dict(network),
                                            f"{name}_lora_adapter_metadata": lora_metadata(cfg)},
                                 weight_name=LORA_FILE, safe_serialization=True)
    return Path(folder) / LORA_FILE


def fuse_into(pipe: Any, lora: Path) -> Any:
    """``pipe`` (the teacher) with the LoRA at ``lora`` merged into its UNet's (or flow
    transformer's) weights and the adapter layers removed: a plain full-weight network
    (diffusers' ``fuse_lora``)."""
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="student")
    from components.networks import network_component

    pipe.fuse_lora(components=[network_component(pipe)], lora_scale=1.0,
                   adapter_names=["student"])
    pipe.unload_lora_weights()
    return pipe


def save_lora_student(teacher_pipe: Any, network: torch.nn.Module, cfg: StudentConfig, spec: Any,
                      folder: str | Path, extra: dict) -> None:
    """Write a LoRA student: its diffusers LoRA in ``folder/lora``, and ``folder`` itself as the
    full-weight student (``components.generation.save_student``) of the LoRA fused into
    ``teacher_pipe``, a freshly loaded teacher pipeline that this consumes."""
    from components.generation import save_student

    folder = Path(folder)
    lora = save_lora(teacher_pipe, network, cfg, folder / LORA_FOLDER)
    save_student(fuse_into(teacher_pipe, lora), spec, folder, {**extra,
                                                               "student": cfg.describe()})


def lora_pipeline(base: str | Path, folder: str | Path, dtype: torch.dtype) -> Any:
    """The LoRA student of ``folder`` exactly as it trained: the teacher pipeline at ``base``
    with the student folder's scheduler and the LoRA loaded by diffusers (not fused)."""
    import diffusers

    folder = Path(folder)
    if not (folder / LORA_FOLDER / LORA_FILE).exists():
        raise FileNotFoundError(f"{folder} holds no LoRA ({LORA_FOLDER}/{LORA_FILE}): it is a "
                                "full student; load it without a base")
    pipe = diffusers.DiffusionPipeline.from_pretrained(base, dtype=dtype)
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    pipe.scheduler = getattr(diffusers, scheduler["_class_name"]).from_pretrained(
        folder, subfolder="scheduler")
    pipe.load_lora_weights(str(folder / LORA_FOLDER), weight_name=LORA_FILE)
    return pipe
