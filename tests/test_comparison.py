"""Comparing variants: the table and plots (pure), and rows read from real DVC experiments."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.comparison import comparison_table, variant_label, varying_params
from pipeline.compare import dvc_rows, main, write_report
from pipeline.lineage import save_experiment
from tests.projects import git


def row(name, method, steps, fid, clip, lr=1e-4, protocol="world-1"):
    params = {"distill.method": method, "distill.loop.steps": steps, "distill.lr": lr,
              "evaluate.num_images": 16}
    return {"name": name, "rev": f"{name}-rev-0123456789", "params": params,
            "metrics": {"fid": fid, "clip_score": clip}, "protocol": protocol}


ROWS = [row("a100", "swiftbrush", 100, 300.0, 0.40), row("a200", "swiftbrush", 200, 280.0, 0.45),
        row("b100", "dmd", 100, 290.0, 0.50), row("b200", "dmd", 200, 270.5, 0.48)]


def test_varying_params_and_labels():
    assert varying_params(ROWS) == ["distill.loop.steps", "distill.method"]
    assert variant_label(ROWS[0], varying_params(ROWS)) == "swiftbrush"
    lr = [*ROWS, row("a100-lr", "swiftbrush", 100, 310.0, 0.41, lr=1e-3)]
    assert variant_label(lr[-1], varying_params(lr)) == "swiftbrush, lr=0.001"
    # MLflow keeps params as text, DVC as YAML values: "100" and 100 are the same value
    text = [{**r, "params": {k: str(v) for k, v in r["params"].items()}} for r in ROWS[:1]]
    assert varying_params([ROWS[0], *text]) == []


def test_table_marks_the_winners():
    lines = comparison_table(ROWS).splitlines()
    assert lines[0] == "| run | rev | method | steps | FID ↓ | CLIP score ↑ | protocol |"
    # grouped by variant, then by steps; the lowest FID and the highest CLIP score in bold
    assert lines[2:6] == ["| b100 | `b100-rev` | dmd | 100 | 290.00 | **0.5000** | world-1 |",
                          "| b200 | `b200-rev` | dmd | 200 | **270.50** | 0.4800 | world-1 |",
                          "| a100 | `a100-rev` | swiftbrush | 100 | 300.00 | 0.4000 | world-1 |",
                          "| a200 | `a200-rev` | swiftbrush | 200 | 280.00 | 0.4500 | world-1 |"]
    assert "- lowest FID: b200 (dmd, 200 steps)" in lines
    assert "- highest CLIP score: b100 (dmd, 100 steps)" in lines
    assert not any("WARNING" in line for line in lines)
    mixed = [*ROWS[:2], row("c", "dmd", 100, 1.0, 0.9, protocol="world-2")]
    assert "different protocols" in comparison_table(mixed)


def test_table_marks_differences_inside_the_noise():
    noisy = [{**r, "metrics": {**r["metrics"], "fid_std": 5.0, "clip_score_std": 0.001}}
             for r in ROWS]
    lines = comparison_table(noisy).splitlines()
    # best FID 270.5; a200 is 9.5 worse, inside 2 x hypot(5, 5) = 14.1; b100 (19.5) is not
    assert "| a200 | `a200-rev` | swiftbrush | 200 | ≈ 280.00 ± 5.00 | 0.4500 ± 0.0010 | " \
           "world-1 |" in lines
    assert "| b100 | `b100-rev` | dmd | 100 | 290.00 ± 5.00 | **0.5000 ± 0.0010** | " \
           "world-1 |" in lines
    assert "- lowest FID: b200 (dmd, 200 steps); inside its noise: a200" in lines
    assert "- highest CLIP score: b100 (dmd, 100 steps)" in lines  # 0.02 apart: outside
    # with a stricter reading of the noise nothing is tied
    assert "inside its noise" not in comparison_table(noisy, noise_multiple=0.5)


def test_report_files(tmp_path):
    table = write_report(ROWS, tmp_path)
    assert (tmp_path / "compare.md").read_text().startswith("# Variants\n\n" + table)
    for name in ("fid_over_steps.png", "clip_over_steps.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


DVC_YAML = """\
params:
  - params.yaml
metrics:
  - metrics/eval.json
"""


@pytest.fixture
def dvc_repo(tmp_path) -> Path:
    git("init", "-q", cwd=tmp_path)
    for args in (["init", "-q"], ["config", "core.analytics", "false"]):
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / "params.yaml").write_text("distill: {method: swiftbrush, loop: {steps: 1}}\n")
    git("add", "-A", cwd=tmp_path)
    git("commit", "-qm", "baseline", cwd=tmp_path)
    return tmp_path


def test_rows_from_dvc_experiments(dvc_repo, tmp_path_factory, capsys):
    """Each variant saved as a DVC experiment (as the nightly flow does), then compared."""
    variants = [("sb-2", "swiftbrush", 2, 300.0, 0.4), ("sb-4", "swiftbrush", 4, 280.0, 0.5),
                ("dmd-2", "dmd", 2, 290.0, 0.45)]
    revs = {}
    for name, method, steps, fid, clip in variants:
        (dvc_repo / "params.yaml").write_text(yaml.safe_dump(
            {"distill": {"method": method, "loop": {"steps": steps}}}))
        (dvc_repo / "metrics").mkdir(exist_ok=True)
        (dvc_repo / "metrics" / "eval.json").write_text(json.dumps(
            {"protocol": "world", "student": {"fid": fid, "clip_score": clip}}))
        revs[name] = save_experiment(dvc_repo, name)
    rows = dvc_rows(dvc_repo)
    assert {r["name"]: r["rev"] for r in rows} == revs  # the baseline has no metrics: left out
    by_name = {r["name"]: r for r in rows}
    assert by_name["sb-4"]["params"]["distill.loop.steps"] == 4
    assert by_name["dmd-2"]["metrics"]["fid"] == 290.0 and by_name["dmd-2"]["protocol"] == "world"
    out = tmp_path_factory.mktemp("report")
    main(["--root", str(dvc_repo), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "- lowest FID: sb-4 (swiftbrush, 4 steps)" in printed
    assert (out / "fid_over_steps.png").exists() and (out / "compare.md").exists()


def test_no_runs_is_a_clear_error(dvc_repo):
    with pytest.raises(SystemExit, match="no dvc runs with evaluation metrics found"):
        main(["--root", str(dvc_repo)])
