"""Memoised ``meta`` kernels: the planner's traces without recomputing the same shapes.

Most ``meta`` kernels are Python (``torch._refs``, ``torch._meta_registrations``): an
elementwise add on ``meta`` tensors costs as much Python as its shape, dtype and stride rules
take, about a millisecond, and a traced iteration of a UNet or a transformer runs tens of
thousands of them, most with arguments already seen (every block of a depth computes the same
shapes, the second trace repeats the first, each optimizer step repeats each parameter shape).
``MetaCache`` is the innermost dispatch mode of a trace: for an operator that neither mutates
nor aliases its inputs (its schema says so, and its first result did not share a storage with
an input or another result) it remembers the outputs' sizes, strides and dtypes by the inputs'
and returns fresh ``meta`` tensors of those on a repeat; an in-place operator (``add_``) whose
first call returned its argument unchanged in shape returns it again (``meta`` has no values
to write; autograd's version counter is bumped above this mode either way). The modes above it (memory and FLOP
counting) see the same operators and the same output tensors as without it, so a trace's
figures do not change (``tests/test_plan.py`` compares the two).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_SCALARS = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout,
            torch.memory_format)


class _Uncacheable(Exception):
    pass


def _leaf_key(x):
    if isinstance(x, torch.Tensor):
        if x.device.type != "meta" or x.layout != torch.strided or type(x) not in (
                torch.Tensor, torch.nn.Parameter):
            raise _Uncacheable
        return (x.dtype, tuple(x.shape), x.stride())
    if isinstance(x, _SCALARS):
        return (type(x), x)  # 1 and 1.0 promote differently
    raise _Uncacheable


def _kind(func) -> str | None:
    """``"functional"``: the schema neither mutates an argument nor returns an alias of one;
    ``"inplace"``: it mutates its first argument only and returns it (``add_``); else None."""
    schema = func._schema
    if not schema.is_mutable and all(r.alias_info is None for r in schema.returns):
        return "functional"
    written = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    if (len(schema.returns) == 1 and len(written) == 1 and written[0] is schema.arguments[0]
            and schema.returns[0].alias_info is not None
            and schema.returns[0].alias_info.before_set == written[0].alias_info.before_set):
        return "inplace"
    return None


def _storages(tensors) -> list[int]:
    return [t.untyped_storage()._cdata for t in tensors]


class MetaCache(TorchDispatchMode):
    """Results of functional ``meta`` operators, by operator and argument metadata."""

    def __init__(self):
        super().__init__()
        self.specs: dict[tuple, tuple | None] = {}  # None: seen, not cacheable
        self.kinds: dict = {}
        self.hits = 0
        self.misses = 0

    def _key(self, func, args, kwargs) -> tuple | None:
        if func not in self.kinds:
            self.kinds[func] = _kind(func)
        if self.kinds[func] is None or (self.kinds[func] == "inplace" and not (
                args and isinstance(args[0], torch.Tensor))):
            return None
        leaves, spec = tree_flatten((args, kwargs))
        try:
            return (func, spec, tuple(_leaf_key(x) for x in leaves))
        except _Uncacheable:
            return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        key = self._key(func, args, kwargs)
        spec = self.specs.get(key) if key is not None else None
        if spec is not None:
            self.hits += 1
            return args[0] if spec == "inplace" else _build(spec)
        out = func(*args, **kwargs)
        if key is not None and key not in self.specs:
            self.misses += 1
            if self.kinds[func] == "inplace":  # the kernel returned its argument, unchanged
                unchanged = out is args[0] and key[2][0] == _leaf_key(out)
                self.specs[key] = "inplace" if unchanged else None
            else:
                self.specs[key] = _spec(out, [x for x in tree_flatten((args, kwargs))[0]
                                              if isinstance(x, torch.Tensor)])
        return out


def _spec(out, inputs: list[torch.Tensor]) -> tuple | None:
    """(is_tuple, [(dtype, size, stride) or None]) of fresh, unaliased ``meta`` outputs."""
    many = isinstance(out, tuple | list)
    outs = list(out) if many else [out]
    tensors = [t for t in outs if t is not None]
    if not all(isinstance(t, torch.Tensor) and type(t) is torch.Tensor for t in tensors):
        return None
    if any(t.device.type != "meta" or t.storage_offset() != 0 or t.is_conj() or t.is_neg()
           or t.layout != torch.strided for t in tensors):
        return None
    own = _storages(tensors)
    if len(set(own)) != len(own) or set(own) & set(_storages(inputs)):
        return None  # a result aliases an input or another result
    specs = [None if t is None else (t.dtype, tuple(t.shape), t.stride()) for t in outs]
    for t, s in zip(outs, specs):
        if t is not None and _build((None, [s])).untyped_storage().nbytes() != (
                t.untyped_storage().nbytes()):
            return None  # a storage larger than its tensor: rebuilt, it would count less
    return (type(out) if many else None, specs)


def _build(spec: tuple):
    kind, specs = spec
    outs = [None if s is None else torch.empty_strided(s[1], s[2], dtype=s[0], device="meta")
            for s in specs]
    return outs[0] if kind is None else kind(outs)
