"""Text embeddings in the plan: the disk a cache of every prompt takes, what the text encoders
cost on each GPU when they encode on the fly instead (``cache.text_embeddings: on_the_fly``), and
which of the two a run should use.

Disk: ``prompts`` x the values one prompt's conditioning holds (the text sequence, SDXL's and the
flow teachers' pooled embedding, SDXL's time ids) x the bytes of ``cache.dtype``. A T5-XXL
teacher's sequence is 333 x 4096 (SD3.5) or 512 x 4096 (FLUX.1) values: 2.7 and 4.2 MB per prompt
in fp16.

On the fly: every GPU holds the frozen encoders' weights in ``cache.precision`` and runs them on
its share of each batch: about 2 FLOPs per weight of every matrix (token embeddings are looked up,
not multiplied) per token, forward only, at the GPU's sustained rate.

Which: the disk cache when it fits ``disk_budget_gib`` (it costs no GPU memory and no time per
iteration), else encoding on the fly when the encoders fit beside the training peak, else
neither: the plan says what would have to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from components.planning.estimate import GIB

MODES = ("disk", "on_the_fly")
DISK_BUDGET_GIB = 500.0  # a default node-local disk share for the cache; --disk-budget


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder: its pipeline slot, weights, the weights of its matrices (those that
    multiply: all but the token embedding tables) and the tokens it encodes per prompt."""

    slot: str
    parameters: int
    matmul_parameters: int
    tokens: int


@dataclass(frozen=True)
class TextRequest:
    """The text side of a run: the configured mode, the number of training prompts (None when
    unknown), bytes per stored value (``cache.dtype``) and per encoder weight
    (``cache.precision``), the disk budget, the encoders and the values per prompt."""

    mode: str
    prompts: int | None
    storage_bytes: int
    weight_bytes: int
    encoders: tuple[TextEncoder, ...]
    values_per_prompt: int
    disk_budget_gib: float = DISK_BUDGET_GIB

    @property
    def bytes_per_prompt(self) -> int:
        return self.values_per_prompt * self.storage_bytes

    @property
    def encoder_bytes(self) -> int:
        """The encoders' weights on each GPU, when they encode on the fly."""
        return sum(e.parameters for e in self.encoders) * self.weight_bytes

    @property
    def resident_bytes(self) -> int:
        """What the configured mode keeps on each GPU beside training."""
        return self.encoder_bytes if self.mode == "on_the_fly" else 0

    @property
    def flops_per_prompt(self) -> float:
        return float(sum(2 * e.matmul_parameters * e.tokens for e in self.encoders))


def _model_class(config: dict[str, Any], slot: str, family: str):
    import transformers

    names = config.get("architectures") or []
    if names and hasattr(transformers, names[0]):
        return getattr(transformers, names[0])
    if "d_model" in config:  # a T5 config
        return transformers.T5EncoderModel
    with_projection = family == "sd3" or (family == "unet" and slot == "text_encoder_2")
    return (transformers.CLIPTextModelWithProjection if with_projection
            else transformers.CLIPTextModel)


def _config(cls, config: dict[str, Any]):
    return cls.config_class(**{k: v for k, v in config.items()
                               if k not in ("architectures", "transformers_version")})


def encoder_of(slot: str, config: dict[str, Any], family: str, text_length: int) -> TextEncoder:
    """A text encoder's weights, counted on ``meta`` from its config (nothing allocated), and
    its tokens per prompt: CLIP's 77, T5 the rest of the teacher's text length (SD3: 256),
    SANA's Gemma-2 its whole text length."""
    cls = _model_class(config, slot, family)
    with torch.device("meta"):
        model = cls(_config(cls, config))
    total = sum(p.numel() for p in model.parameters())
    lookups = {id(m.weight): m.weight.numel() for m in model.modules()
               if isinstance(m, torch.nn.Embedding)}  # a tied table counted once
    tables = sum(lookups.values())
    clip = "d_model" not in config and family != "sana"  # SANA's encoder is Gemma-2
    tokens = int(config.get("max_position_embeddings", 77)) if clip else (
        text_length - 77 if family == "sd3" else text_length)
    return TextEncoder(slot, total, total - tables, tokens)


def folder_encoder_configs(folder: str | Path) -> dict[str, dict[str, Any]]:
    """The text encoder configs of a pipeline folder, by slot (configs only, no weights)."""
    import json

    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    out = {}
    for slot in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        config = folder / slot / "config.json"
        if index.get(slot) and index[slot][0] is not None and config.is_file():
            out[slot] = json.loads(config.read_text())
    return out


def text_plan(text: TextRequest, training_bytes: float, usable_bytes: float,
              global_batch: int, gpus: int, flops_per_second: float) -> dict[str, Any]:
    """The plan's ``text_embeddings`` section (see the module docstring). ``training_bytes``:
    the planned peak per GPU without the encoders; ``flops_per_second``: one GPU's sustained
    rate."""
    encoders_fit = training_bytes + text.encoder_bytes <= usable_bytes
    seconds = global_batch * text.flops_per_prompt / (gpus * flops_per_second)
    out: dict[str, Any] = {
        "mode": text.mode, "prompts": text.prompts,
        "mb_per_prompt": round(text.bytes_per_prompt / 1e6, 4),
        "disk_gib": None if text.prompts is None else round(
            text.prompts * text.bytes_per_prompt / GIB, 3),
        "disk_budget_gib": text.disk_budget_gib,
        "encoders": [{"slot": e.slot, "parameters": e.parameters, "tokens": e.tokens}
                     for e in text.encoders],
        "encoders_gib": round(text.encoder_bytes / GIB, 3),
        "encoders_fit_beside_training": encoders_fit,
        "on_the_fly_seconds_per_iteration": float(f"{seconds:.4g}")}
    if text.prompts is None:
        out["recommended"] = None
        out["reason"] = ("the number of training prompts is not known (run prepare_prompts, or "
                         "pass --prompts N)")
        return out
    disk = out["disk_gib"]
    if disk <= text.disk_budget_gib:
        out["recommended"] = "disk"
        out["reason"] = (f"the cache of {text.prompts} prompts takes {disk:.3g} GiB, within the "
                         f"{text.disk_budget_gib:g} GiB disk budget; encoding once saves "
                         f"{out['encoders_gib']:.3g} GiB per GPU and {seconds:.3g} s per "
                         "iteration")
    elif encoders_fit:
        out["recommended"] = "on_the_fly"
        out["reason"] = (f"the cache of {text.prompts} prompts would take {disk:.4g} GiB, over "
                         f"the {text.disk_budget_gib:g} GiB disk budget; the encoders' "
                         f"{out['encoders_gib']:.3g} GiB fit beside training on each GPU and "
                         f"add {seconds:.3g} s per iteration")
    else:
        out["recommended"] = None
        out["reason"] = (f"neither fits: the cache would take {disk:.4g} GiB (budget "
                         f"{text.disk_budget_gib:g} GiB) and the encoders' "
                         f"{out['encoders_gib']:.3g} GiB do not fit beside training; raise the "
                         "disk budget, use fewer prompts, or lower training memory (bf16, "
                         "activation checkpointing, more GPUs)")
    return out
