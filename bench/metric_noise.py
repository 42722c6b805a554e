"""How well the eval card's ``fid_std`` predicts FID's spread over seeds, on real Inception features.

    uv run python bench/metric_noise.py --sets 5 --threads 1 --out bench/results/metric_noise.json

The world protocol's shape with ground-truth renders standing in for a model, FID of each set of
``--n`` renders against the statistics of ``--n-reference`` other renders (the FID Inception
weights, the world's resize), ``--sets`` times: (a) ``--n`` fixed scenes (the caption list)
rendered with another seed, (b) fresh scenes with another seed. The spread over (b) is what the
delete-half jackknife (``components.evaluation.uncertainty``: what ``evaluate`` reports, from one
set) estimates: the noise of drawing N images; (a) is the smaller noise of other seeds on one
caption list. The ordinary bootstrap is shown for contrast. Prints a markdown table and writes
the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from components.evaluation.fid import (
    feature_statistics,
    fid_against_statistics,
    inception_features,
)
from components.evaluation.inception import load_inception
from components.evaluation.uncertainty import HalfSampling, subsample_fid
from components.world.render import SceneSpace, render, sample_scene


def renders(scenes, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([render(scene, size, rng) for scene in scenes])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python bench/metric_noise.py")
    parser.add_argument("--n", type=int, default=256, help="images per set (the protocol's N)")
    parser.add_argument("--n-reference", type=int, default=512)
    parser.add_argument("--sets", type=int, default=8, help="seeds rendered per scene list")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--replicates", type=int, default=200)
    parser.add_argument("--cache", type=Path, default=Path(".cache/inception"))
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.monotonic()
    net = load_inception(args.cache, "fid-helper", "cpu")
    space = SceneSpace()
    scene_rng = np.random.default_rng(0)
    scenes = [sample_scene(space, scene_rng) for _ in range(args.n)]
    reference = [sample_scene(space, scene_rng) for _ in range(args.n_reference)]
    mu, sigma = feature_statistics(inception_features(renders(reference, args.size, 10_000), net))
    noise = HalfSampling(args.replicates)
    rows = []
    for seed in range(args.sets):
        fixed = fid_against_statistics(mu, sigma, inception_features(
            renders(scenes, args.size, seed), net))
        fresh_rng = np.random.default_rng(100 + seed)
        fresh = [sample_scene(space, fresh_rng) for _ in range(args.n)]
        features = inception_features(renders(fresh, args.size, seed), net)
        fids = subsample_fid(mu, sigma, features, noise.indices(args.n))
        boot = np.random.default_rng(seed).integers(0, args.n, (args.replicates, args.n))
        rows.append({"seed": seed, "fid_fixed_captions": fixed,
                     "fid": fid_against_statistics(mu, sigma, features),
                     "jackknife_std": noise.standard_error(fids, args.n),
                     "bootstrap_std": float(np.std([fid_against_statistics(mu, sigma, features[i])
                                                    for i in boot], ddof=1))})
        print(f"seed {seed}: {rows[-1]}", flush=True)
    summary = {"fid_std_over_draws": float(np.std([r["fid"] for r in rows], ddof=1)),
               "fid_std_over_seeds_fixed_captions": float(np.std(
                   [r["fid_fixed_captions"] for r in rows], ddof=1)),
               "jackknife_std_mean": float(np.mean([r["jackknife_std"] for r in rows])),
               "bootstrap_std_mean": float(np.mean([r["bootstrap_std"] for r in rows])),
               "n": args.n, "n_reference": args.n_reference, "sets": args.sets,
               "seconds": round(time.monotonic() - start, 1),
               "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads"}
    print("\n| set | FID, fixed captions | FID, fresh draw | jackknife s.e. | bootstrap s.e. |\n"
          "| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['seed']} | {r['fid_fixed_captions']:.2f} | {r['fid']:.2f} | "
              f"{r['jackknife_std']:.2f} | {r['bootstrap_std']:.2f} |")
    print(f"\nstd of FID over {args.sets} fresh draws {summary['fid_std_over_draws']:.2f}, over "
          f"seeds on fixed captions {summary['fid_std_over_seeds_fixed_captions']:.2f}; mean "
          f"jackknife s.e. {summary['jackknife_std_mean']:.2f}; mean bootstrap s.e. "
          f"{summary['bootstrap_std_mean']:.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
