"""Teacher families behind the ``Denoiser`` protocol, one file each (the only place that knows
its model's call conventions): diffusers UNets (``components.teacher.UNetDenoiser``), SD3/SD3.5
MMDiT transformers (``sd3``), FLUX.1 transformers (``flux``) and SANA linear-attention DiTs
(``sana``).

``PIPELINES`` names the diffusers pipeline classes of each family; a teacher of any other family
fails at load with that list.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

PIPELINES = {"StableDiffusionPipeline": "unet", "StableDiffusionXLPipeline": "unet",
             "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux", "SanaPipeline": "sana"}


class UnsupportedTeacherError(ValueError):
    """The teacher's pipeline belongs to no supported family; the message lists them."""


def supported() -> str:
    return ", ".join(f"{name} ({family})" for name, family in PIPELINES.items())


def check_pipeline_class(class_name: str, source: str) -> str:
    """The family of pipeline class ``class_name``, or one error listing the supported ones."""
    if class_name not in PIPELINES:
        raise UnsupportedTeacherError(
            f"teacher {source} is a {class_name}, which Distillery cannot distil; supported "
            f"teacher pipelines: {supported()}")
    return PIPELINES[class_name]


def folder_traits(folder: str | Path) -> dict[str, Any] | None:
    """What config checks need of a local teacher folder, from its configs alone (no weights):
    ``family`` (``unet``, ``sd3``, ``flux``, ``sana``) and ``embedded_guidance`` (a guidance-distilled
    FLUX.1-dev transformer); None for a folder without ``model_index.json``. A pipeline of an
    unsupported family raises ``UnsupportedTeacherError`` listing the supported ones."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        return None
    kind = check_pipeline_class(json.loads(index.read_text()).get("_class_name", "?"),
                                str(folder))
    config = Path(folder) / "transformer" / "config.json"
    embedded = kind == "flux" and config.is_file() and bool(
        json.loads(config.read_text()).get("guidance_embeds", False))
    return {"family": kind, "embedded_guidance": embedded}


def zero_w_projection(transformer: torch.nn.Module, w_dim: int) -> torch.nn.Linear:
    """A zero-initialised map from a ``w_dim`` guidance-weight embedding onto the transformer's
    pooled text projection (Meng et al.'s w input: the untrained student is the teacher), on the
    transformer's device and dtype."""
    param = next(transformer.parameters())
    pooled = transformer.config.pooled_projection_dim
    proj = torch.nn.Linear(w_dim, pooled, device=param.device, dtype=param.dtype)
    torch.nn.init.zeros_(proj.weight)
    torch.nn.init.zeros_(proj.bias)
    return proj


@torch.no_grad()
def fold_w_projection(denoiser: torch.nn.Module, w: float) -> torch.nn.Module:
    """A copy of a w-conditioned flow denoiser's transformer with its w input fixed at ``w``:
    the projection of the w embedding is a constant added to the pooled text projection,
    whose first use is a linear layer, so it folds into that layer's bias
    (``b + W c``). The copy is a stock transformer that computes what the student computes at
    ``w``."""
    import copy

    from components.diffusion import guidance_embedding

    transformer = copy.deepcopy(denoiser.transformer)
    proj = denoiser.w_proj
    linear = transformer.time_text_embed.text_embedder.linear_1
    param = proj.weight
    c = proj(guidance_embedding(torch.tensor([float(w)], device=param.device),
                                proj.in_features).to(param.dtype))[0]
    linear.bias.add_((linear.weight.double() @ c.double().to(linear.weight.device)).to(
        linear.bias.dtype))
    return transformer


def saved_network(student: torch.nn.Module, spec: Any) -> tuple[str, torch.nn.Module, Any]:
    """What a student folder holds of a trained ``Denoiser``: the pipeline component's name
    (``unet`` or ``transformer``), its plain diffusers module and the generator spec that
    reproduces the student with it (a flow student's w input folded in at its guidance
    weight, so its spec has no w embedding left)."""
    import dataclasses

    if hasattr(student, "unet"):
        return "unet", student.unet, spec
    if getattr(student, "w_proj", None) is None:
        return "transformer", student.transformer, spec
    if hasattr(student, "fold_w"):  # the family folds its w input its own way (SANA)
        folded = student.fold_w(spec.guidance_weight)
    else:
        folded = fold_w_projection(student, spec.guidance_weight)
    return "transformer", folded, dataclasses.replace(spec, w_dim=0)


def is_flow(pipe: Any) -> bool:
    """Whether a loaded pipeline is of a flow-transformer family (by its class, so a UNet
    pipeline loaded with ``unet=None`` is still a UNet pipeline)."""
    return PIPELINES.get(type(pipe).__name__, "unet") != "unet"


def network_component(pipe: Any) -> str:
    """The name of the pipeline component that denoises: ``unet`` or ``transformer``."""
    return "transformer" if is_flow(pipe) else "unet"


def network_device(pipe: Any) -> torch.device:
    """The device of the pipeline's denoising network (where its noise goes)."""
    return getattr(pipe, network_component(pipe)).device


def family(pipe: Any) -> str:
    """The family of a loaded pipeline (its class name)."""
    return check_pipeline_class(type(pipe).__name__, "pipeline")


def flow_denoiser(pipe: Any, compute_dtype: torch.dtype | None = None,
                  latent_hw: tuple[int, int] | None = None) -> torch.nn.Module:
    """The transformer of an SD3, FLUX or SANA pipeline as a ``Denoiser`` (flow prediction)."""
    kind = family(pipe)
    if kind == "sd3":
        from components.networks.sd3 import sd3_denoiser

        return sd3_denoiser(pipe, compute_dtype)
    if kind == "flux":
        from components.networks.flux import flux_denoiser

        return flux_denoiser(pipe, compute_dtype, latent_hw)
    if kind == "sana":
        from components.networks.sana import sana_denoiser

        return sana_denoiser(pipe, compute_dtype)
    raise UnsupportedTeacherError(f"{type(pipe).__name__} has no flow transformer")


@torch.no_grad()
def encode(pipe: Any, prompts: Sequence[str]):
    """Text conditioning of a flow pipeline, through its own ``encode_prompt``."""
    kind = family(pipe)
    if kind == "sd3":
        from components.networks.sd3 import encode_sd3

        return encode_sd3(pipe, prompts)
    if kind == "sana":
        from components.networks.sana import encode_sana

        return encode_sana(pipe, prompts)
    from components.networks.flux import encode_flux

    return encode_flux(pipe, prompts)


def latent_shape(pipe: Any) -> tuple[int, int, int]:
    """(C, h, w) of a flow pipeline's latents at its native resolution."""
    if family(pipe) in ("sd3", "sana"):
        size = pipe.transformer.config.sample_size
        return (pipe.transformer.config.in_channels, size, size)
    # FLUX: 16-channel latents, packed 2×2 into the transformer's 64 input channels
    side = pipe.default_sample_size
    return (pipe.transformer.config.in_channels // 4, side, side)
