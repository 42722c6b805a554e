"""The training policy: precision, activation checkpointing, compilation, fused optimizers, TF32
and FSDP2 sharding, applied by the loop to every method alike (``params.yaml: distill.policy``).

The loop sees a method's networks in two kinds, found without asking the method:
- *state modules* (``method.state_modules()``): what the optimizers train, plus frozen networks
  whose weights change during the run (a phase's frozen copy); they are checkpointed. Under more
  than one process each is sharded with FSDP2 (``fully_shard`` per UNet / transformer block, then
  the root): parameters, gradients and optimizer state are split over the processes, and the
  gradients are reduce-scattered (averaged over processes, in fp32) during the backward.
- *frozen denoisers*: the method's other ``Denoiser`` modules (the teacher); replicated.

Precision ``fp32`` is the published SiD / SwiftBrush recipe (TF32 off unless ``tf32``).
``bf16``: every parameter no optimizer holds is stored in bf16; trained parameters keep fp32
master weights and compute in bf16 (autocast in one process, FSDP2's ``MixedPrecisionPolicy``
when sharded); the denoiser adapter returns fp32, so losses, their normalisations and gradient
reduction stay fp32, and the EMA (a copy of the fp32 weights) is fp32.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from components import distributed
from components.teacher import enable_gradient_checkpointing

PRECISIONS = ("fp32", "bf16")
_BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks")


@dataclass(frozen=True)
class PolicyConfig:
    """``params.yaml: distill.policy``. ``reshard_after_forward``: FSDP2 frees gathered weights
    after each block's forward (least memory) or keeps them until the backward (less traffic)."""

    precision: str = "fp32"
    activation_checkpointing: bool = False
    compile: bool = False
    fused_optimizer: bool = False
    tf32: bool = False
    reshard_after_forward: bool = True

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"distill.policy.precision {self.precision!r} is unknown; valid "
                             f"precisions are: {', '.join(PRECISIONS)}")


def optimized_parameters(opts: dict) -> set[int]:
    """Ids of every parameter some optimizer holds."""
    return {id(p) for opt in opts.values() for g in opt.param_groups for p in g["params"]}


def frozen_denoisers(method) -> dict[str, torch.nn.Module]:
    """The method's ``Denoiser`` modules that are not state modules (e.g. the teacher)."""
    held = {id(m) for m in method.state_modules().values()}
    return {name: m for name, m in vars(method).items()
            if isinstance(m, torch.nn.Module) and hasattr(m, "prediction_type")
            and id(m) not in held}


def blocks(network: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The UNet / transformer blocks of the outermost diffusers models inside ``network`` (the
    sharding units; models nested inside a block, e.g. a UNet's transformers, stay in it)."""
    if hasattr(network, "config"):
        for name in _BLOCK_LISTS:
            yield from getattr(network, name, None) or ()
        if getattr(network, "mid_block", None) is not None:
            yield network.mid_block
        return
    for child in network.children():
        yield from blocks(child)


class TrainingPolicy:
    """Placement, precision and sharding of a method's networks, owned by the training loop."""

    def __init__(self, cfg: PolicyConfig | None = None):
        self.cfg = cfg or PolicyConfig()
        self.cfg.validate()
        self.ctx = distributed.context()
        self.sharded = self.ctx.world_size > 1
        self._skeletons: dict[int, torch.nn.Module] = {}

    def describe(self) -> dict:
        """The policy as recorded with a run (resolved config, eval card, MLflow)."""
        return {**asdict(self.cfg), "processes": self.ctx.world_size,
                "sharding": "fsdp2" if self.sharded else "none"}

    @property
    def bf16(self) -> bool:
        return self.cfg.precision == "bf16"

    def prepare(self, method) -> dict:
        """Apply the policy to ``method``'s networks; return its optimizers (built afterwards,
        so that they hold the sharded parameters)."""
        torch.backends.fp32_precision = "tf32" if self.cfg.tf32 else "ieee"
        state = method.state_modules()
        networks = [*state.values(), *frozen_denoisers(method).values()]
        if self.cfg.activation_checkpointing:
            for net in networks:
                enable_gradient_checkpointing(net)
        if self.sharded:
            student = method.student()
            self._skeletons[id(student)] = meta_skeleton(student)
            mesh = distributed.device_mesh(_device_of(student))
            for module in state.values():
                self._shard(module, mesh)
        opts = {name: self.make_optimizer(method, name)
                for name in dict.fromkeys(g.optimizer_name for g in method.groups)}
        if self.bf16:
            trained = optimized_parameters(opts)
            for net in (frozen_denoisers(method).values() if self.sharded else networks):
                _store_frozen_in_bf16(net, trained)
        if self.cfg.compile:
            for net in networks:
                net.compile()
        return opts

    def make_optimizer(self, method, name: str) -> torch.optim.Optimizer:
        """The method's optimizer ``name`` (a fresh state), with the policy's kernels."""
        opt = method.make_optimizer(name)
        if self.cfg.fused_optimizer:
            for group in opt.param_groups:
                group.update(fused=True, foreach=False)
        return opt

    def _shard(self, module: torch.nn.Module, mesh) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if self.bf16 else None,
                                  reduce_dtype=torch.float32)
        kw = {"mesh": mesh, "mp_policy": mp,
              "reshard_after_forward": self.cfg.reshard_after_forward}
        for block in list(blocks(module)):
            fully_shard(block, **kw)
        fully_shard(module, **kw)

    def autocast(self, device: torch.device):
        """bf16 compute for fp32 weights in one process (FSDP2 casts when sharded)."""
        if not self.bf16 or self.sharded or not torch.amp.is_autocast_available(device.type):
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def gradient_sync(self, method, enabled: bool) -> None:
        """Reduce gradients at this backward (the last micro-batch) or keep accumulating."""
        if not self.sharded:
            return
        from torch.distributed.fsdp import FSDPModule

        for module in method.state_modules().values():
            if isinstance(module, FSDPModule):
                module.set_requires_gradient_sync(enabled)

    def full_module(self, module: torch.nn.Module) -> torch.nn.Module | None:
        """``module`` unsharded: itself in one process; under FSDP2 a plain copy gathered on
        rank 0 (``None`` on the others). Every process must call it (a collective)."""
        if not self.sharded:
            return module
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True,
                                                                     cpu_offload=True))
        if not self.ctx.is_main:
            return None
        plain = copy.deepcopy(self._skeletons[id(module)]).to_empty(device=_device_of(module))
        plain.load_state_dict(full, strict=True)
        return plain.train(module.training)


def meta_skeleton(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` with every tensor on the ``meta`` device (no memory)."""
    memo: dict = {}
    for p in module.parameters():
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def _device_of(module: torch.nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    if tensor is None:
        return torch.device("cpu")
    local = getattr(tensor, "to_local", None)
    return (local() if local else tensor).device


@torch.no_grad()
def _store_frozen_in_bf16(network: torch.nn.Module, trained: set[int]) -> None:
    """Parameters no optimizer holds (and floating buffers of frozen networks) in bf16."""
    params = list(network.parameters())
    if not any(id(p) in trained for p in params):
        network.to(torch.bfloat16)
        return
    for p in params:
        if id(p) not in trained and p.dtype.is_floating_point:
            p.data = p.data.to(torch.bfloat16)
