"""Loading a teacher (a hub id or a local diffusers folder) and adapting its UNet to ``Denoiser``.

The miniature world's teacher and Stable Diffusion go through the same code: a diffusers pipeline
folder loaded with ``from_pretrained``.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from components.diffusion import NoiseSchedule, PredictionType


class TeacherNotFoundError(FileNotFoundError):
    """The configured teacher cannot be loaded; the message says how to supply it."""


@dataclass(frozen=True)
class TeacherConfig:
    """``params.yaml: teacher``. ``model`` is a local diffusers folder or a hub id."""

    model: str = "models/teacher"
    revision: str | None = None
    variant: str | None = None


@dataclass(frozen=True)
class TextConditioning:
    """Text conditioning of a batch: token embeddings, plus SDXL's pooled embeddings and time ids,
    SD3's and FLUX's pooled embeddings, and SANA's attention mask over the tokens.

    Every field is (B, ...) or None; the methods below apply to each field that is present."""

    text: torch.Tensor  # (B, L, D)
    pooled: torch.Tensor | None = None  # (B, D_pooled): SDXL, SD3, FLUX
    time_ids: torch.Tensor | None = None  # (B, 6), SDXL only
    mask: torch.Tensor | None = None  # (B, L), 1 where a token is attended: SANA only

    def _map(self, fn, *others: TextConditioning) -> TextConditioning:
        out = {}
        for f in fields(self):
            a = getattr(self, f.name)
            out[f.name] = None if a is None else fn(a, *(getattr(o, f.name) for o in others))
        return TextConditioning(**out)

    def concat(self, other: TextConditioning) -> TextConditioning:
        return self._map(lambda a, b: torch.cat([a, b]), other)

    def to(self, device: torch.device | str) -> TextConditioning:
        return self._map(lambda a: a.to(device))

    def cast(self, dtype: torch.dtype) -> TextConditioning:
        """Every field in ``dtype`` (a mask's 0 and 1 are exact in any float dtype)."""
        return self._map(lambda a: a.to(dtype))

    def expand(self, batch: int) -> TextConditioning:
        """Repeat a single-row conditioning (e.g. the empty prompt) to ``batch`` rows."""
        return self._map(lambda a: a.expand(batch, *a.shape[1:]))

    def rows(self, index: slice | torch.Tensor) -> TextConditioning:
        """The rows ``index`` of every field (a micro-batch, or a selection)."""
        return self._map(lambda a: a[index])

    def where(self, mask: torch.Tensor, other: TextConditioning) -> TextConditioning:
        """Rows of ``other`` where ``mask`` (B,) is true, else rows of ``self``."""
        return self._map(lambda a, b: torch.where(mask.view(-1, *([1] * (a.ndim - 1))), b, a),
                         other)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields that are present, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None}


class UNetDenoiser(torch.nn.Module):
    """A diffusers ``UNet2DConditionModel`` behind the ``Denoiser`` protocol.

    Knows diffusers' call conventions: ``encoder_hidden_states``, SDXL's ``added_cond_kwargs``
    and an optional ``timestep_cond``; runs the network in ``compute_dtype`` and returns fp32.
    """

    def __init__(self, unet: torch.nn.Module, schedule: NoiseSchedule,
                 prediction_type: PredictionType, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.unet = unet
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.compute_dtype = compute_dtype

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: TextConditioning,
                timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.compute_dtype or next(self.unet.parameters()).dtype
        added = None
        if cond.pooled is not None:
            added = {"text_embeds": cond.pooled.to(dtype), "time_ids": cond.time_ids.to(dtype)}
        if timestep_cond is not None:  # the w embedding enters like the text: in the UNet's dtype
            timestep_cond = timestep_cond.to(dtype)
        out = self.unet(x_t.to(dtype), t, encoder_hidden_states=cond.text.to(dtype),
                        added_cond_kwargs=added, timestep_cond=timestep_cond,
                        return_dict=False)[0]
        return out.float()

    def with_w_embedding(self, w_dim: int) -> UNetDenoiser:
        """A copy whose UNet also takes a guidance-weight embedding (B, w_dim) as
        ``timestep_cond`` (diffusers' ``time_cond_proj_dim``); the new projection starts at zero,
        so the copy computes exactly what this network does, whatever w."""
        from diffusers import UNet2DConditionModel

        if self.unet.config.get("time_cond_proj_dim") == w_dim:
            unet = copy.deepcopy(self.unet)
        else:
            # diffusers drops keys listed in "_use_default_values": give it a clean config
            config = {k: v for k, v in self.unet.config.items() if not k.startswith("_")}
            source = next(self.unet.parameters())
            with torch.device(source.device):  # built where the teacher lives, not on the CPU
                unet = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": w_dim})
            missing, unexpected = unet.load_state_dict(self.unet.state_dict(), strict=False)
            if unexpected or any("cond_proj" not in k for k in missing):
                raise ValueError(f"cannot add a w embedding to this UNet: missing {missing}, "
                                 f"unexpected {unexpected}")
            torch.nn.init.zeros_(unet.time_embedding.cond_proj.weight)
            if unet.dtype != source.dtype:  # even a no-op Module.to fails on fake tensors
                unet.to(source.dtype)
        return UNetDenoiser(unet, self.schedule, self.prediction_type, self.compute_dtype)


def enable_gradient_checkpointing(network: torch.nn.Module) -> None:
    """Turn on activation checkpointing in every diffusers model inside ``network`` (no-op for
    networks without it, e.g. the analytic ones)."""
    for module in network.modules():
        if hasattr(module, "enable_gradient_checkpointing") and hasattr(module, "config"):
            module.enable_gradient_checkpointing()


def is_local_reference(model: str) -> bool:
    """A path-like string (existing, relative with a separator, or absolute) is a local folder."""
    return os.path.exists(model) or model.startswith((".", "/", "~")) or (
        model.count("/") != 1 and "/" in model)


def resolve_model(model: str, root: Path) -> str:
    """Local folders are resolved against the project root; hub ids pass through unchanged."""
    path = Path(model).expanduser()
    if not path.is_absolute() and (root / path).exists():
        return str(root / path)
    if path.exists():
        return str(path)
    if is_local_reference(model) or model.startswith("models/"):
        raise TeacherNotFoundError(
            f"teacher folder {model!r} does not exist (looked in {root / path}). Build the "
            "miniature world's teacher with `dvc repro bootstrap`, or set `teacher.model` in "
            "params.yaml to a local diffusers pipeline folder or a hub id such as "
            "'stable-diffusion-v1-5/stable-diffusion-v1-5'.")
    return model


def load_pipeline(cfg: TeacherConfig, root: Path, dtype: torch.dtype = torch.float32,
                  **components: Any) -> Any:
    """Load the teacher's diffusers pipeline (folder or hub id) with the safety checker off.

    ``components`` replace or skip parts (``text_encoder=None`` does not load the text encoder).
    """
    from diffusers import DiffusionPipeline

    source = resolve_model(cfg.model, root)
    if Path(source).is_dir() and not (Path(source) / "model_index.json").exists():
        raise TeacherNotFoundError(
            f"{source} is not a diffusers pipeline folder (no model_index.json); point "
            "`teacher.model` at a folder written by `save_pretrained`.")
    kwargs: dict[str, Any] = {"dtype": dtype, **components}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.variant:
        kwargs["variant"] = cfg.variant
    index = Path(source) / "model_index.json"
    if index.exists():
        import json

        from components.networks import check_pipeline_class

        check_pipeline_class(json.loads(index.read_text()).get("_class_name", "?"), source)
        kwargs.update({k: v for k, v in absent_parts(source).items() if k not in kwargs})
    if "safety_checker" in _expected_components(source):
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = (" The hub is not reachable offline (HF_HUB_OFFLINE=1): download the model "
                "on a connected machine and point `teacher.model` at the local folder, or run "
                "with DISTILLERY_OFFLINE=0 where the hub is reachable.") if offline else ""
        raise TeacherNotFoundError(f"cannot load teacher {cfg.model!r}: {err}.{hint}") from None


def absent_parts(folder: str | Path) -> dict[str, None]:
    """The parts a pipeline folder was saved without (``[null, null]`` in ``model_index.json``:
    SD3 without its T5 encoder), each ``None``: diffusers loads a folder only when they are
    passed so (``StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None,
    tokenizer_3=None)``)."""
    import json

    index = Path(folder) / "model_index.json"
    if not index.exists():
        return {}
    return {k: None for k, v in json.loads(index.read_text()).items() if v == [None, None]}


def _expected_components(source: str) -> set[str]:
    index = Path(source) / "model_index.json"
    if index.exists():
        import json

        return set(json.loads(index.read_text()))
    return {"safety_checker"}


def teacher_denoiser(pipe: Any, compute_dtype: torch.dtype | None = None,
                     latent_hw: tuple[int, int] | None = None) -> torch.nn.Module:
    """The pipeline's network as a ``Denoiser``: a UNet with the scheduler's own ᾱ table, or a
    flow transformer (SD3, FLUX; ``components.networks``) with its shifted flow schedule
    (FLUX's shift depends on the latent size ``latent_hw``, default the native one)."""
    from components.networks import flow_denoiser, is_flow

    if is_flow(pipe):
        return flow_denoiser(pipe, compute_dtype, latent_hw)
    schedule = NoiseSchedule.from_scheduler(pipe.scheduler)
    kind = pipe.scheduler.config.get("prediction_type", "epsilon")
    return UNetDenoiser(pipe.unet, schedule, kind, compute_dtype)
