"""File IO at the edges: atomic writes, content hashes, JSON."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(root: str | Path) -> str:
    """Hash of a folder: relative paths and file contents, in sorted order."""
    root = Path(root)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(sha256_file(path).encode())
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` whole.

    On an exception the temporary folder is removed and ``path`` is left as it was, so a failed
    stage never leaves a half-written output behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


class CacheError(RuntimeError):
    """A cache folder is missing, stale or corrupt; the message says how to rebuild it."""


def load_verified_shard(folder: Path, entry: dict, what: str) -> dict:
    """The tensors of cache file ``entry`` ({"file", "sha256"}) in ``folder``, after checking its
    hash; a missing or corrupt file is a ``CacheError`` that says how to rebuild it."""
    from safetensors.torch import load_file

    path = Path(folder) / entry["file"]
    if not path.exists() or sha256_file(path) != entry["sha256"]:
        raise CacheError(f"{what} {path} is missing or corrupt (sha256 mismatch); "
                         "rebuild it with `dvc repro cache_teacher --force` "
                         "(or restore it with `dvc checkout`)")
    return load_file(str(path))


def save_tensors(path: Path, tensors: dict) -> str:
    """Write a safetensors file atomically; return its sha256."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
    return sha256_file(path)


def write_resumable_shards(out_dir: Path, key: dict, count: int, shard_size: int, prefix: str,
                           make: Callable[[int, int], dict], log: Callable[[int, int], None]
                           ) -> tuple[Path, list[dict]]:
    """Write shards of rows ``[start, stop)`` (``make(start, stop)`` -> tensors) into
    ``<out_dir>.partial``, one file each, recording every finished shard. A re-run with the same
    ``key`` keeps the shards a killed run completed (hash-checked) and makes only the rest.
    Returns the work folder and the shard entries; ``publish_shards`` finishes the job."""
    work = out_dir.with_name(out_dir.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    progress_path = work / "progress.json"
    progress = read_json(progress_path) if progress_path.exists() else {}
    if progress.get("key") != key:
        progress = {"key": key, "shards": []}
    done = {s["file"]: s for s in progress["shards"]
            if (work / s["file"]).exists() and sha256_file(work / s["file"]) == s["sha256"]}
    shards = []
    for k, start in enumerate(range(0, count, shard_size)):
        name = f"{prefix}-{k:05d}.safetensors"
        stop = min(start + shard_size, count)
        if name not in done:
            done[name] = {"file": name, "start": start, "count": stop - start,
                          "sha256": save_tensors(work / name, make(start, stop))}
            progress["shards"] = list(done.values())
            write_json(progress_path, progress)
            log(k, stop)
        shards.append(done[name])
    return work, shards


def publish_shards(work: Path, out_dir: Path, index: dict) -> None:
    """Write ``index.json`` into the work folder and let it replace ``out_dir`` by rename."""
    progress = work / "progress.json"
    if progress.exists():
        progress.unlink()
    write_json(work / "index.json", index)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(work, out_dir)
