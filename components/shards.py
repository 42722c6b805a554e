"""Sharded safetensors tables: the on-disk format both teacher caches share.

A table of N rows is a folder of safetensors files, each holding rows ``start .. start + count``
of every field (``{"text": (n, L, D), ...}``), plus a JSON index that lists the shards as
``{"file", "start", "count", "sha256"}``. Writing goes one shard at a time into
``<dir>.partial`` (a killed run keeps its finished shards and resumes after them); the finished
folder replaces ``<dir>`` by rename.

Reading is lazy (``ShardedTable``): a shard is memory-mapped with ``safe_open`` the first time
one of its rows is asked for, its hash is checked then and only then, and only the requested
rows are copied out. A process that trains on some rows never reads the others.
"""

from __future__ import annotations

import bisect
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed

from components import distributed
from components.io import CacheError, read_json, sha256_file, write_json

REBUILD = ("rebuild it with `dvc repro cache_teacher --force` (or restore it with "
           "`dvc checkout`)")


def save_tensors(path: Path, tensors: dict) -> str:
    """Write a safetensors file atomically; return its sha256."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
    return sha256_file(path)


def verify(folder: Path, entry: dict, what: str) -> Path:
    """The path of file ``entry`` ({"file", "sha256"}) in ``folder`` after checking its hash; a
    missing or corrupt file is a ``CacheError`` that says how to rebuild it."""
    path = Path(folder) / entry["file"]
    if not path.exists() or sha256_file(path) != entry["sha256"]:
        raise CacheError(f"{what} {path} is missing or corrupt (sha256 mismatch); {REBUILD}")
    return path


def load_verified(folder: Path, entry: dict, what: str) -> dict[str, torch.Tensor]:
    """Every tensor of one small hash-checked file (e.g. the empty prompt's embedding)."""
    from safetensors.torch import load_file

    return load_file(str(verify(folder, entry, what)))


def write_resumable_shards(out_dir: Path, key: dict, count: int, shard_size: int, prefix: str,
                           make: Callable[[int, int], dict], log: Callable[[int, int], None],
                           rank: int = 0, world_size: int = 1) -> Path:
    """Write shards of rows ``[start, stop)`` (``make(start, stop)`` -> tensors) into
    ``<out_dir>.partial``, one file each, recording every finished shard. Shard k is this
    process's when ``k % world_size == rank`` (each process keeps its own progress file). A
    re-run with the same ``key`` keeps the shards a killed run completed, with any process
    count (hash-checked), and makes only the rest. Returns the work folder;
    ``finished_shards`` lists the shards once every process is done."""
    work = out_dir.with_name(out_dir.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    done = {s["file"]: s for s in _recorded(work, key)
            if (work / s["file"]).exists() and sha256_file(work / s["file"]) == s["sha256"]}
    mine = []
    for k, start in enumerate(range(0, count, shard_size)):
        name = f"{prefix}-{k:05d}.safetensors"
        if k % world_size != rank:
            continue
        stop = min(start + shard_size, count)
        if name not in done:
            done[name] = {"file": name, "start": start, "count": stop - start,
                          "sha256": save_tensors(work / name, make(start, stop))}
            mine.append(done[name])
            write_json(work / f"progress-{rank}.json", {"key": key, "shards": mine})
            log(k, stop)
        elif done[name] not in mine:
            mine.append(done[name])
    write_json(work / f"progress-{rank}.json", {"key": key, "shards": mine})
    return work


def _recorded(work: Path, key: dict) -> list[dict]:
    """Shard entries recorded under ``key`` by any process of any earlier run."""
    out = []
    for path in sorted(work.glob("progress-*.json")):
        progress = read_json(path)
        if progress.get("key") == key:
            out.extend(progress["shards"])
    return out


def finished_shards(work: Path, key: dict, count: int, shard_size: int) -> list[dict]:
    """Every shard's entry, in order, once all processes have written theirs."""
    entries = {s["file"]: s for s in _recorded(work, key)}
    shards = sorted(entries.values(), key=lambda s: s["start"])
    expected = len(range(0, count, shard_size))
    if len(shards) != expected:
        raise CacheError(f"{work}: {len(shards)} of {expected} shards were written; re-run "
                         "`dvc repro cache_teacher` to finish them")
    return shards


def publish_shards(work: Path, out_dir: Path, index: dict) -> None:
    """Write ``index.json`` into the work folder and let it replace ``out_dir`` by rename."""
    for progress in work.glob("progress-*.json"):
        progress.unlink()
    write_json(work / "index.json", index)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(work, out_dir)


def processes() -> tuple[int, int]:
    """(rank, world size) of the running ``torch.distributed`` job; (0, 1) when there is none."""
    ctx = distributed.context()
    return ctx.rank, ctx.world_size


def _barrier() -> None:
    if processes()[1] > 1:
        torch.distributed.barrier()


def write_table(out_dir: Path, key: dict, count: int, shard_size: int, prefix: str,
                make: Callable[[int, int], dict], log: Callable[[int, int], None],
                finish: Callable[[Path, list[dict]], dict]) -> dict:
    """Write a sharded table, its shards split over the processes of a ``torch.distributed``
    job (shard k by rank ``k % world``; rows are index-determined, so the table does not depend
    on the process count). Rank 0 then calls ``finish(work, shards)`` for the index (it may add
    files to ``work``) and publishes the folder; every process returns the index."""
    rank, world = processes()
    work = write_resumable_shards(out_dir, key, count, shard_size, prefix, make, log, rank,
                                  world)
    _barrier()
    if rank == 0:
        publish_shards(work, out_dir, finish(work, finished_shards(work, key, count,
                                                                   shard_size)))
    _barrier()
    return read_json(out_dir / "index.json")


class ShardedTable:
    """Rows of a sharded table, read lazily from memory-mapped shards.

    ``rows(field, indices)`` opens (and hash-checks, once) only the shards that hold
    ``indices`` and copies out only those rows, in the order asked for.
    """

    def __init__(self, folder: str | Path, shards: Sequence[dict], what: str):
        self.folder, self.what = Path(folder), what
        self.shards = list(shards)
        self._starts = [int(s["start"]) for s in self.shards]
        self._count = sum(int(s["count"]) for s in self.shards)
        self._files: dict[int, object] = {}
        self._verified: set[int] = set()

    def __len__(self) -> int:
        return self._count

    @property
    def opened(self) -> list[str]:
        """File names of the shards opened so far (each hash-checked once)."""
        return [self.shards[k]["file"] for k in sorted(self._files)]

    def verify(self) -> None:
        """Check every shard's hash now (each is checked once, here or when first read), so a
        corrupt cache stops a run before it starts rather than at the step that reads it."""
        for k in range(len(self.shards)):
            self._check(k)

    def _check(self, k: int) -> Path:
        path = self.folder / self.shards[k]["file"]
        if k not in self._verified:
            verify(self.folder, self.shards[k], self.what)
            self._verified.add(k)
        return path

    def _file(self, k: int):
        if k not in self._files:
            from safetensors import safe_open

            self._files[k] = safe_open(str(self._check(k)), framework="pt")
        return self._files[k]

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self._count:
            raise IndexError(f"row {i} is outside the {self._count} rows of {self.folder}")
        k = bisect.bisect_right(self._starts, i) - 1
        return k, i - self._starts[k]

    def rows(self, field: str, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Rows ``indices`` (B,) of ``field``: a new tensor (B, ...) in the stored dtype."""
        indices = torch.as_tensor(indices).reshape(-1).tolist()
        out: list[torch.Tensor] = []
        for i in indices:
            k, local = self._locate(int(i))
            out.append(self._file(k).get_slice(field)[local:local + 1])
        return torch.cat(out) if out else self._file(0).get_slice(field)[0:0]
