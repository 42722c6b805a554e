"""Reading training batches from the embedding cache: lazy rows versus the whole table.

    uv run python bench/cache_read.py --rows 4096 --out bench/results/cache-read-cpu.json

Writes an fp16 cache of ``--rows`` prompts with SD1.5's embedding shape (77 x 768) into a
temporary folder, then measures in fresh processes: opening the cache, drawing ``--batches``
batches of ``--batch`` rows through ``PromptBatches`` (hash checks of the shards it touches
included), and, for comparison, materialising the whole table as fp32 (what a reader that loads
everything holds). Memory is the process's allocated (anonymous) memory growth, Linux only.
Prints a markdown table and writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, re, sys, time, torch
from components.batches import PromptBatches
from components.embed_cache import EmbeddingCache
from components.training import step_generator
anon = lambda: int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
folder, mode, batches, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
before, start = anon(), time.perf_counter()
cache = EmbeddingCache(folder)
grown = 0
if mode == "lazy":
    source = PromptBatches.from_cache(cache, (4, 64, 64))
    for step in range(batches):
        source(batch, step_generator(0, step), step)
        grown = max(grown, anon() - before)
else:
    table = cache.conditioning(torch.arange(len(cache)))
    grown = anon() - before
print(json.dumps({"seconds": time.perf_counter() - start, "anon_mib": grown / 1024,
                  "shards_opened": len(cache.opened)}))
"""


def probe(folder: Path, mode: str, batches: int, batch: int) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(folder), mode, str(batches),
                          str(batch)], cwd=ROOT, check=True, capture_output=True, text=True)
    return {"mode": mode, **json.loads(out.stdout.strip().splitlines()[-1])}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--shard-size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from components.embed_cache import CacheConfig, write_cache

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "cache"
        write_cache(folder, [f"p{i}" for i in range(args.rows)],
                    lambda b: torch.randn(len(b), 77, 768), CacheConfig(
                        shard_size=args.shard_size, batch_size=256), "bench", log=lambda _: None)
        table_mib = args.rows * 77 * 768 * 2 / 2**20
        rows = [probe(folder, "lazy", args.batches, args.batch),
                probe(folder, "whole", args.batches, args.batch)]
    result = {"machine": f"{os.cpu_count()}-core {platform.machine()} CPU",
              "torch": torch.__version__, "rows": args.rows, "table_fp16_mib": table_mib,
              "batch": args.batch, "batches": args.batches, "results": rows}
    print(f"fp16 cache: {args.rows} x 77 x 768 ({table_mib:.0f} MiB), shards of "
          f"{args.shard_size}, {args.batches} batches of {args.batch}")
    print("| reader | seconds | allocated MiB | shards opened |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['mode']} | {r['seconds']:.2f} | {r['anon_mib']:.1f} | "
              f"{r['shards_opened']} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
