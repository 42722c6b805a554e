"""The training-step benchmark runs every registered method on the CPU at a tiny size."""

from __future__ import annotations

import json

import pytest

from bench.train_step import main, table
from components.methods import method_names


def test_bench_measures_every_registered_method(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(["--device", "cpu", "--divisor", "8", "--latent", "4", "--batch-sizes", "1", "2",
          "--warmup", "0", "--iters", "1", "--threads", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert {r["method"] for r in result["rows"]} == set(method_names())
    for row in result["rows"]:
        assert row["iter_s"] > 0 and row["flop_per_iter"] > 0 and row["mfu"] is None
    by_batch = {r["batch"]: r["flop_per_iter"] for r in result["rows"]
                if r["method"] == "swiftbrush"}
    assert 1.8 < by_batch[2] / by_batch[1] < 2.2  # model FLOPs scale with the batch
    printed = capsys.readouterr().out
    assert table(result["rows"], "peak RSS GiB (process)") in printed


def test_mfu_against_a_given_peak(tmp_path):
    out = tmp_path / "bench.json"
    main(["--device", "cpu", "--divisor", "8", "--latent", "4", "--batch-sizes", "1",
          "--methods", "swiftbrush", "--warmup", "0", "--iters", "1", "--threads", "1",
          "--peak-tflops", "0.1", "--out", str(out)])
    row = json.loads(out.read_text())["rows"][0]
    expected = row["flop_per_iter"] / row["iter_s"] / 1e12 / 0.1
    assert row["mfu"] == pytest.approx(expected, rel=1e-3)
