"""LoRA adapters through peft on any ``nn.Module`` (a diffusers UNet or an analytic network).

One network then serves two roles: adapters disabled give the frozen base (the teacher), enabled
give the adapted copy (SwiftBrush's "fake teacher"), with only the LoRA weights trainable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def add_lora(module: torch.nn.Module, rank: int, alpha: float,
             targets: Sequence[str]) -> list[torch.nn.Parameter]:
    """Inject LoRA (rank, alpha) into the layers whose names end with ``targets``; freeze the base.

    Returns the LoRA parameters (the only ones that train). Fails clearly if nothing matched.
    """
    from peft import LoraConfig, inject_adapter_in_model

    module.requires_grad_(False)
    try:
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha,
                                           target_modules=list(targets)), module)
    except ValueError as err:
        raise ValueError(f"LoRA targets {list(targets)} match no layer of "
                         f"{type(module).__name__}: {err}") from None
    params = [p for n, p in module.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def set_adapters(module: torch.nn.Module, enabled: bool) -> None:
    """Turn every LoRA layer of ``module`` on (adapted network) or off (the base network)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.enable_adapters(enabled)
