"""The methods report: numbers with their noise, the inside-the-noise mark, the floors."""

from __future__ import annotations

import json

import pytest

from pipeline import methods_report


def _metrics(fid, fid_std, clip=0.5, steps=1, attrs=None):
    return {"fid": fid, "fid_std": fid_std, "clip_score": clip, "clip_score_std": 0.01,
            "steps": steps, "attribute_accuracy": attrs or {"colour": 0.5, "all": 0.1}}


def _result(method, fid, fid_std):
    return {"method": method, "eval": {
        "protocol": "world", "student": _metrics(fid, fid_std),
        "teacher": _metrics(190.0, 2.0, 0.76, 25, {"colour": 0.7, "shape": 0.52, "all": 0.06}),
        "teacher_1step": _metrics(265.0, 2.5, 0.25),
        "real_renders": _metrics(17.6, 1.0, 0.8, 0, {"colour": 1.0, "all": 1.0})},
        "distill": {"steps": 300, "images_seen": 9600, "wall_seconds": 500.0},
        "proxy_fid": [[50.0, 100.0], [260.0, 250.0]]}


def _rows(text: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def test_report_marks_the_best_and_what_is_inside_its_noise(tmp_path):
    # b is 3 FID behind a with standard errors 2 and 2: inside 2 x hypot(2, 2) = 5.7;
    # c is 20 behind: outside
    results = [_result("a", 200.0, 2.0), _result("b", 203.0, 2.0), _result("c", 220.0, 2.0)]
    rows = _rows(methods_report.report(results, tmp_path))
    assert rows["a *"][1] == "200.0 ± 2.0" and rows["a *"][2] == "0.500 ± 0.010"
    assert "b ≈" in rows and "c" in rows and "c ≈" not in rows
    assert rows["teacher (DDIM, CFG)"][:2] == ["25", "190.0 ± 2.0"]
    # colour, shape, size, position, all: what was judged, "–" for what was not
    assert rows["teacher (DDIM, CFG)"][3:8] == ["0.70", "0.52", "–", "–", "0.06"]
    assert rows["floor: real renders"][0] == "–" and rows["floor: real renders"][7] == "1.00"
    assert (tmp_path / "methods_fid.png").stat().st_size > 0


def test_report_is_written_again_from_a_finished_runs_results(tmp_path, capsys):
    results = [_result("a", 200.0, 2.0), _result("b", 230.0, 2.0)]
    (tmp_path / "methods.json").write_text(json.dumps(results))
    methods_report.main(["--root", str(tmp_path), "--results", str(tmp_path / "methods.json")])
    text = (tmp_path / "reports" / "methods.md").read_text()
    assert "| a * |" in text and "| b |" in text
    with pytest.raises(SystemExit, match="no such file"):
        methods_report.main(["--root", str(tmp_path), "--results", str(tmp_path / "nope.json")])
