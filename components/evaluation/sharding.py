"""Evaluation split over the processes of a ``torch.distributed`` job, exactly.

Image i is seeded ``base_seed + i``, and images are generated and scored in batches of
``batch_size`` consecutive indices. Process r takes the batches b with ``b % world == r``: each
batch is computed whole, by one process, exactly as a single process computes it. Gathering the
per-image results to rank 0 (``torch.distributed.gather_object``) and ordering them by index
therefore gives the single-process results bit for bit, whatever the process count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from components import distributed

Generate = Callable[[list[str], list[int]], np.ndarray]  # (captions, seeds) -> uint8 images


def processes() -> tuple[int, int]:
    """(rank, world size) of the running ``torch.distributed`` job; (0, 1) without one."""
    ctx = distributed.context()
    return ctx.rank, ctx.world_size


def shard_indices(n: int, batch_size: int, rank: int = 0, world: int = 1) -> list[int]:
    """Image indices process ``rank`` of ``world`` generates: its whole batches, in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [i for start in range(rank * batch_size, n, world * batch_size)
            for i in range(start, min(start + batch_size, n))]


def aligned_chunk(chunk: int, batch_size: int) -> int:
    """The largest multiple of ``batch_size`` not above ``chunk`` (at least one batch), so chunks
    of a process's images split into the same batches a single process makes."""
    return max(1, chunk // batch_size) * batch_size


def gather_by_index(indices: Sequence[int], arrays: dict[str, np.ndarray] | None
                    ) -> dict[str, np.ndarray] | None:
    """On rank 0: every process's per-image ``arrays`` (rows matching ``indices``; None for a
    process with no rows), concatenated in image-index order; None on the other ranks and when
    no process has rows. One process: ``arrays`` as given."""
    rank, world = processes()
    if world == 1:
        return arrays
    import torch.distributed as dist

    parts: list | None = [None] * world if rank == 0 else None
    dist.gather_object((list(indices), arrays), parts, dst=0)
    if rank != 0:
        return None
    parts = [(ix, a) for ix, a in parts if a is not None and len(ix)]
    if not parts:
        return None
    order = np.argsort(np.concatenate([np.asarray(ix, dtype=np.int64) for ix, _ in parts]),
                       kind="stable")
    return {k: np.concatenate([a[k] for _, a in parts])[order] for k in parts[0][1]}


def measure_sharded(measure: Callable[[Iterator], dict], generate: Generate,
                    captions: Sequence[str], seeds: Sequence[int], batch_size: int,
                    keep: Callable[[int], bool], chunk: int = 1024) -> dict | None:
    """Generate and measure this process's share of the images (``shard_indices``) in chunks
    of whole batches; on rank 0 return every image's measurements in index order (``measure``'s
    arrays, e.g. features and CLIP similarities) plus ``images``: the images whose index
    ``keep`` accepts (e.g. the grid's). None on the other ranks."""
    rank, world = processes()
    mine = shard_indices(len(captions), batch_size, rank, world)
    kept_ix, kept = [], []

    def chunks():
        step = aligned_chunk(chunk, batch_size)
        for start in range(0, len(mine), step):
            ix = mine[start:start + step]
            caps = [captions[i] for i in ix]
            images = generate(caps, [seeds[i] for i in ix])
            picked = [k for k, i in enumerate(ix) if keep(i)]
            kept_ix.extend(ix[k] for k in picked)
            kept.append(images[picked])
            yield images, caps
    measured = measure(chunks()) if mine else None
    out = gather_by_index(mine, measured)
    images = gather_by_index(kept_ix, {"images": np.concatenate(kept)} if kept_ix else None)
    if rank != 0:
        return None
    return {**out, "images": images["images"] if images else np.zeros((0, 1, 1, 3), np.uint8)}


def broadcast(value):
    """Rank 0's ``value`` on every process (one process: ``value``)."""
    rank, world = processes()
    if world == 1:
        return value
    import torch.distributed as dist

    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
