"""What a GPU run computes that the ``meta`` device does not: fused attention and autocast.

A trace on ``meta`` tensors runs every operator's shape function and nothing else, so it is as
fast as Python dispatch allows, but two things differ from a CUDA run:

- **Attention.** On ``meta`` (and in any math fallback) ``scaled_dot_product_attention`` is a
  matmul, a softmax and another matmul, and its backward keeps the (B, heads, L, L) attention
  weights. A GPU run uses a fused kernel (FlashAttention or memory-efficient attention) that keeps
  only the output and one log-sum-exp per query. ``GpuKernels`` routes every call through
  ``aten._scaled_dot_product_flash_attention_for_cpu``, the fused kernel whose saved tensors are
  those of the GPU kernels (query, key, value, output, log-sum-exp) and which the CPU itself picks
  for unmasked attention, so a CPU run and the trace agree too. Its FLOPs are counted with
  ``torch.utils.flop_counter``'s own SDPA formulas (``ATTENTION_FLOPS``).
- **Autocast.** ``torch.autocast`` has no ``meta`` backend, so ``GpuKernels`` applies CUDA
  autocast's casting rules for bf16 at the ``torch`` function level (above autograd, where
  autocast itself works): matmuls, convolutions, linear layers and attention run on bf16 copies
  of their floating inputs, normalisations, softmax and losses on fp32 ones, everything else in
  its inputs' dtypes. Casts of trainable parameters are cached for the autocast region, as
  autocast caches them. Recomputation under activation checkpointing (inside the backward) runs
  under the same rules, as ``torch.utils.checkpoint`` restores autocast for it
  (``GpuKernels.checkpoint``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten
_FLASH = aten._scaled_dot_product_flash_attention_for_cpu


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args,
                              out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# FlopCounterMode(custom_mapping=ATTENTION_FLOPS): torch counts no FLOPs for the CPU's fused
# kernel; these are the formulas it uses for the CUDA ones (2 matmuls forward, 5 backward).
ATTENTION_FLOPS = {_FLASH: _attention_flops,
                   aten._scaled_dot_product_flash_attention_for_cpu_backward:
                   _attention_backward_flops}


def fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                    scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention`` through the fused kernel (output only)."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(repeat, dim=-3)
        value = value.repeat_interleave(repeat, dim=-3)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill(
            ~attn_mask, float("-inf"))
    return _FLASH(query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


def _fns(*names: str, modules=(torch, torch.Tensor, F)) -> set:
    return {getattr(m, n) for n in names for m in modules if hasattr(m, n)}


# CUDA autocast's op lists (aten/src/ATen/autocast_mode.cpp), at the torch-function level
LOWER = _fns("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
             "conv_transpose3d", "matmul", "__matmul__", "__rmatmul__", "mm", "mv", "bmm",
             "baddbmm", "addmm", "addbmm", "addmv", "addr", "einsum", "chain_matmul", "prelu",
             "scaled_dot_product_attention")
FP32 = {"cuda": _fns("group_norm", "layer_norm", "softmax", "log_softmax", "exp", "expm1", "log",
                     "log1p", "log2", "log10", "pow", "__pow__", "rsqrt", "reciprocal",
                     "softplus", "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss",
                     "cosine_similarity", "cumsum", "cumprod", "logsumexp", "norm", "kl_div",
                     "nll_loss", "binary_cross_entropy_with_logits", "cross_entropy", "cdist",
                     "dist", "prod"),
        # the CPU's rules keep norms and softmax in bf16: used to check the model on a CPU
        "cpu": _fns("mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "kl_div", "nll_loss",
                    "binary_cross_entropy_with_logits", "cross_entropy", "cdist", "prod")}


class GpuKernels(TorchFunctionMode):
    """Fused attention always; autocast to ``autocast`` (a dtype) inside ``region()``, the
    autocast context the loop enters, by the ``rules`` of CUDA (or of the CPU, to check), and
    in the recomputation of blocks checkpointed through ``checkpoint``."""

    def __init__(self, autocast: torch.dtype | None = None, rules: str = "cuda"):
        super().__init__()
        self.dtype, self.fp32 = autocast, FP32[rules]
        self.depth = 0  # > 0 inside an autocast region
        self.cache: dict[int, torch.Tensor] | None = None

    @contextlib.contextmanager
    def region(self):
        """The autocast context (a no-op without an autocast dtype)."""
        self.depth += 1
        outer = self.cache is None
        if outer:
            self.cache = {}
        try:
            yield
        finally:
            self.depth -= 1
            if outer:
                self.cache = None

    def checkpoint(self, module, *args):
        """diffusers' ``gradient_checkpointing_func``: ``torch.utils.checkpoint`` whose
        recomputation (inside the backward, where no mode of the forward is active) runs under
        this mode again, casting as the forward did (autocast restored, as checkpoint does)."""
        from torch.utils.checkpoint import checkpoint

        def contexts():
            return contextlib.nullcontext(), self._recompute(self.depth > 0)
        return checkpoint(module.__call__, *args, use_reentrant=False, context_fn=contexts)

    @contextlib.contextmanager
    def _recompute(self, casting: bool):
        depth, cache = self.depth, self.cache
        self.depth, self.cache = int(casting), None
        try:
            with self:
                yield
        finally:
            self.depth, self.cache = depth, cache

    def _cast(self, x, dtype: torch.dtype):
        if isinstance(x, list | tuple):
            return type(x)(self._cast(v, dtype) for v in x)
        if not (torch.is_tensor(x) and x.is_floating_point() and x.dtype != dtype):
            return x
        if dtype != torch.float32 and x.dtype != torch.float32:
            return x  # autocast lowers only fp32 (fp64 and the rest are left alone)
        cacheable = self.cache is not None and x.is_leaf and x.requires_grad
        if cacheable and id(x) in self.cache:
            return self.cache[id(x)]
        out = x.to(dtype)
        if cacheable:
            self.cache[id(x)] = out
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtype = None
        if self.dtype is not None and self.depth > 0:
            dtype = self.dtype if func in LOWER else torch.float32 if func in self.fp32 else None
        if dtype is not None:
            args = tuple(self._cast(a, dtype) for a in args)
            kwargs = {k: v if k == "dtype" else self._cast(v, dtype) for k, v in kwargs.items()}
        if func is F.scaled_dot_product_attention:
            return fused_attention(*args, **kwargs)
        return func(*args, **kwargs)
