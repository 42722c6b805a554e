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


def test_variants_name_a_method_and_its_step_count():
    assert methods_report.parse_variant("dmd2") == ("dmd2", 1)
    assert methods_report.parse_variant("sid_lsg@4") == ("sid_lsg", 4)
    for bad, message in [("dmd3", "unknown method 'dmd3'"), ("dmd2@x", "positive integer"),
                         ("meng@4", "few-step students are trained by")]:
        with pytest.raises(ValueError, match=message):
            methods_report.parse_variant(bad)
    with pytest.raises(SystemExit, match="--methods: .*positive integer"):
        methods_report.main(["--methods", "dmd2@0"])


def test_added_rows_join_an_earlier_run_and_name_their_commits(tmp_path):
    earlier = [_result("a", 200.0, 2.0), _result("dmd2", 230.0, 2.0)]  # no commit recorded
    four = {**_result("dmd2", 210.0, 2.0), "generator_steps": 4, "label": "dmd2, 4-step",
            "commit": "abc1234"}
    redone = {**_result("a", 205.0, 2.0), "generator_steps": 1, "label": "a", "commit": "abc1234"}
    merged = methods_report.merge(earlier, [redone, four])
    assert [methods_report._label(r) for r in merged] == ["dmd2", "a", "dmd2, 4-step"]
    text = methods_report.report(merged, tmp_path)
    rows = _rows(text)
    assert rows["a *"][1] == "205.0 ± 2.0" and rows["dmd2, 4-step ≈"][1] == "210.0 ± 2.0"
    assert rows["dmd2"][1] == "230.0 ± 2.0"
    assert "Rows ran at different commits: abc1234: a, dmd2, 4-step; not recorded: dmd2." in text
