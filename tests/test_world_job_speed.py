"""The world-job comparison bench: what it reads from a stage log, its table, its bad input."""

from __future__ import annotations

import pytest

from bench import world_job_speed as bench


def test_the_loop_rate_is_the_last_tqdm_rate_in_either_unit(tmp_path):
    log = tmp_path / "distill.log"
    log.write_text("distill (sid_lsg):  50%| 1/2 [00:19<00:19, 19.01s/step]"
                   "distill (sid_lsg): 100%| 2/2 [00:28<00:00, 14.34s/step]\n")
    assert bench.seconds_per_step(log) == pytest.approx(14.34)
    log.write_text("distill (dmd2): 100%| 300/300 [03:20<00:00, 1.25step/s]\n")
    assert bench.seconds_per_step(log) == pytest.approx(0.8)
    log.write_text("distill: resuming from step 300 of 300\n")
    assert bench.seconds_per_step(log) is None


def test_table_sums_the_stages():
    seconds = {"prepare_prompts": 30.0, "cache_teacher": 60.0, "reference_stats": 100.0,
               "distill": 400.0}
    text = bench.table([{"rev": "old", "commit": "e40a93d1234", "seconds": seconds,
                         "seconds_per_step": 1.5},
                        {"rev": "HEAD", "commit": "abcdef0123", "seconds": seconds,
                         "seconds_per_step": None}])
    rows = [line for line in text.splitlines() if line.startswith("| old") or "HEAD" in line]
    assert rows[0].endswith("| 30 | 60 | 100 | 400 | 590 | 1.50 |")
    assert rows[1].endswith("| 590 | – |") and "e40a93d1" in rows[0]


def test_a_project_without_a_world_is_refused_with_the_fix(tmp_path):
    with pytest.raises(SystemExit, match="run `uv run dvc repro bootstrap` there first"):
        bench.main(["--revs", "HEAD", "--from", str(tmp_path)])


def test_side_by_side_stages_are_timed_each_to_its_own_end(tmp_path, monkeypatch):
    """The first-listed revision finishing last must not lengthen the other's time."""
    import subprocess
    import sys

    seconds = {"slow": 1.5, "fast": 0.2}
    monkeypatch.setattr(bench, "PREP", ())
    monkeypatch.setattr(bench, "_stage", lambda dest, stage: subprocess.Popen(
        [sys.executable, "-c", f"import time; time.sleep({seconds[dest.name]})"]))
    times = bench.measure({"slow": tmp_path / "slow", "fast": tmp_path / "fast"},
                          concurrent=True)
    assert times["fast"]["distill"] < 1.0 <= times["slow"]["distill"]
