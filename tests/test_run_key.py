"""The distill run key: it changes with everything the student depends on (configs, inputs,
code) and not with cadence or run length, except for the methods whose phases are fractions of
``loop.steps``; run folders beyond ``keep_runs`` are pruned, most recently active kept."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from components.config import ConfigError, from_dict, to_dict
from components.methods import Teacher, get_method, method_names
from components.teacher import teacher_denoiser
from components.training import LoopConfig
from pipeline.checkpoints import STEP_PHASED, code_hash, prune_runs, run_key
from pipeline.params import DistillConfig
from tests.projects import copy_project
from tests.threads import one_thread  # noqa: F401
from tests.tiny import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


def _distill(method: str = "swiftbrush", **loop) -> DistillConfig:
    data = yaml.safe_load((ROOT / "pipeline/presets/micro.yaml").read_text())["distill"]
    data["method"] = method
    data["loop"].update(loop)
    return from_dict(DistillConfig, data, "distill")


def _key(cfg: DistillConfig, **inputs) -> str:
    resolved = {"teacher": {"model": "models/teacher"}, "distill": to_dict(cfg),
                "method_config": to_dict(cfg.method_config()), "teacher_sha256": "t",
                "cache": "c", "code": "k", **inputs}
    return run_key(resolved, cfg.method)


def test_cadence_run_length_and_monitoring_do_not_change_the_key():
    base = _distill()
    same = [_distill(steps=400), _distill(log_every=7, sample_every=3, checkpoint_every=9),
            replace(base, sample_prompts=2, sample_seed=5, proxy_fid_images=0, keep_runs=5),
            replace(base, save="best")]  # which of its weights is saved: the same training
    assert {_key(c) for c in same} == {_key(base)}
    # another method's section is not this run's config either
    other = replace(base, methods={**base.methods, "sid_lsg": {"generator_lr": 1.0}})
    assert _key(other) == _key(base)


def test_what_the_student_depends_on_changes_the_key():
    base = _distill()
    keys = {_key(base), _key(_distill(seed=1)), _key(_distill(batch_size=8)),
            _key(replace(base, methods={**base.methods,
                                        "swiftbrush": {"ema": {"kind": "constant"}}})),
            _key(replace(base, device="cuda")),
            _key(replace(base, methods={**base.methods, "swiftbrush": {"student_lr": 1.0}})),
            _key(base, code="edited"), _key(base, cache="other prompts"),
            _key(base, teacher_sha256="other weights"), _key(base, pairs="other pairs")}
    assert len(keys) == 10


@pytest.mark.parametrize("method", STEP_PHASED)
def test_steps_are_in_the_key_of_methods_phased_by_steps(method):
    assert _key(_distill(method, steps=4)) != _key(_distill(method, steps=8))
    assert _key(_distill(method, log_every=3)) == _key(_distill(method))


def _schedule(method) -> dict:
    """What of a built method depends on its run length: its optimizer groups' phases and any
    number it keeps (phase boundaries)."""
    numbers = {k: v for k, v in vars(method).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {"groups": method.groups, **numbers}


def test_step_phased_lists_exactly_the_methods_whose_schedule_depends_on_steps():
    """Built at two run lengths, only the methods in ``STEP_PHASED`` differ in schedule, so no
    other method's checkpoint is ever resumed under a schedule it was not trained with."""
    teacher = Teacher(teacher_denoiser(tiny_pipeline(0)))
    phased = set()
    for name in method_names():
        cfg_cls, build = get_method(name)
        cfg = cfg_cls(**({"lpips_fraction": 0.0} if name == "instaflow" else {}))
        if _schedule(build(cfg, teacher, 100)) != _schedule(build(cfg, teacher, 200)):
            phased.add(name)
    assert phased == set(STEP_PHASED)


def test_code_hash_covers_the_distill_code_and_only_it(tmp_path):
    project = copy_project(tmp_path / "p")
    before = code_hash(project)
    (project / "components/evaluation/clip_score.py").write_text("# evaluation only\n")
    assert code_hash(project) == before  # not a distill dependency in dvc.yaml
    method = project / "components/methods/swiftbrush.py"
    method.write_text(method.read_text().replace("lora_lr", "lora_lr ", 1))
    assert code_hash(project) != before
    # the same code in another clone hashes the same
    assert code_hash(copy_project(tmp_path / "q")) == before


def test_prune_keeps_the_current_run_and_the_most_recent_others(tmp_path):
    for age, name in enumerate(["new", "mid", "old", "current"]):
        (tmp_path / name).mkdir()
        (tmp_path / name / "clock.json").write_text("{}")
        os.utime(tmp_path / name / "clock.json", (1e9 - age * 100, 1e9 - age * 100))
    assert prune_runs(tmp_path, 2, "current") == ["mid", "old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "new"]
    assert prune_runs(tmp_path, 1, "current") == ["new"]
    shutil.rmtree(tmp_path / "current")


@pytest.mark.parametrize("key", ["log_every", "sample_every", "checkpoint_every", "batch_size"])
def test_every_cadence_and_size_is_checked_up_front(key):
    with pytest.raises(ConfigError, match=rf"^distill\.loop: {key} must be at least 1, got 0$"):
        from_dict(LoopConfig, {key: 0}, "distill.loop")
    with pytest.raises(ConfigError, match=rf"{key} must be at least 1, got -4$"):
        from_dict(LoopConfig, {key: -4}, "distill.loop")


# Imported by the distill stage but captured by value in the run key (configs and their loading)
# or naming paths only: editing them neither re-runs distillation nor restarts its checkpoints.
CONFIG_ONLY = {"components/config.py", "components/prompts.py",
               "components/evaluation/protocols.py", "pipeline/params.py", "pipeline/env.py",
               "pipeline/paths.py", "pipeline/stages/__init__.py"}
PACKAGE_MARKERS = {"components/__init__.py", "components/evaluation/__init__.py",
                   "pipeline/__init__.py"}


def test_distill_code_deps_cover_every_module_the_stage_runs():
    """Every project module the distill stage imports (and those ``save_student`` and the flow
    teachers' adapters import when they run) is a dvc.yaml dependency of the stage, hence in its
    run key's code hash."""
    import subprocess
    import sys

    script = ("import sys, pipeline.stages.distill, components.stock_scheduler\n"
              "import components.flow_stock, components.networks.sd3, components.networks.flux\n"
              "from components.methods import method_names; method_names()\n"
              "print('\\n'.join(m.__file__ for n, m in sys.modules.items()\n"
              "      if n.split('.')[0] in ('components', 'pipeline')))")
    listing = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["distill"]["deps"]
    for file in listing:
        rel = Path(file).resolve().relative_to(ROOT).as_posix()
        if rel in CONFIG_ONLY or rel in PACKAGE_MARKERS:
            continue
        assert any(rel == d or rel.startswith(d + "/") for d in deps), f"{rel} not in deps"


def _other_runs(folder: Path, names: list[str]) -> None:
    for age, name in enumerate(names):
        (folder / name).mkdir(parents=True)
        (folder / name / "clock.json").write_text("{}")
        os.utime(folder / name / "clock.json", (1e9 - age * 100, 1e9 - age * 100))


def test_only_rank_0_prunes_and_only_once_this_run_holds_a_checkpoint(tmp_path):
    """The distill stage's progress callback prunes other runs (to ``keep_runs``) at the first
    step that wrote a checkpoint, and never on a non-zero rank (the loop also calls it on rank 0
    only)."""
    from pipeline import paths
    from pipeline.checkpoints import RunRecord
    from pipeline.stages.distill import _progress

    folder = tmp_path / paths.CHECKPOINTS
    _other_runs(folder, ["recent", "older", "oldest"])
    cfg = replace(_distill(steps=4, checkpoint_every=2), keep_runs=2)
    progress, bar = _progress(tmp_path, cfg, RunRecord(folder / "current"), "current", False)
    progress(2, 4)  # a non-zero rank, at a checkpoint step: nothing deleted
    bar.close()
    assert sorted(p.name for p in folder.iterdir()) == ["current", "older", "oldest", "recent"]
    progress, bar = _progress(tmp_path, cfg, RunRecord(folder / "current"), "current", True)
    progress(1, 4)  # no checkpoint of this run yet
    assert len(list(folder.iterdir())) == 4
    progress(2, 4)
    bar.close()
    assert sorted(p.name for p in folder.iterdir()) == ["current", "recent"]


def test_a_killed_segment_keeps_its_rows_grids_and_wall_time_up_to_its_checkpoint(tmp_path):
    """A segment killed after logging step 5 with its last checkpoint at step 4: the next segment
    keeps the loss and proxy-FID rows and the grids of steps 1-4, drops the rows of step 5 (it
    logs them again) and counts the killed segment's wall time up to its last step."""
    import json
    import time

    from pipeline.checkpoints import RunRecord

    killed = RunRecord(tmp_path)
    for step in range(1, 6):
        killed.add({"step": step, "loss": 1.0 / step})
        killed.add({"step": step, "proxy_fid": 100.0 - step})
        (killed.samples / f"step-{step:07d}.png").write_bytes(b"grid")
        time.sleep(0.01)
        killed.tick()  # the loop's progress callback, after every step
    killed_s = killed.segment_seconds()
    del killed  # kill -9: nothing more is written

    resumed = RunRecord(tmp_path)
    resumed.resume_from(4)
    assert [r["step"] for r in resumed.rows] == [1, 1, 2, 2, 3, 3, 4, 4]
    on_disk = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert on_disk == resumed.rows
    assert sorted(p.name for p in resumed.samples.iterdir())[:4] == [
        f"step-{s:07d}.png" for s in range(1, 5)]
    resumed.add({"step": 5, "loss": 0.2})
    assert 0.04 <= resumed.wall_seconds() - resumed.segment_seconds() <= killed_s
    both = resumed.wall_seconds()
    resumed.tick()
    third = RunRecord(tmp_path)  # a third segment counts both earlier ones
    assert third.wall_seconds() >= both
    assert [r["step"] for r in third.rows][-1] == 5


def test_save_best_is_checked_at_load():
    with pytest.raises(ValueError, match="save must be 'last' or 'best'"):
        replace(_distill(), save="first").validate()
    with pytest.raises(ConfigError, match=r"proxy FID, which is off \(proxy_fid_images: 0\)"):
        from_dict(DistillConfig, {**to_dict(_distill()), "save": "best",
                                  "proxy_fid_images": 0}, "distill")


def test_best_student_keeps_the_lowest_proxy_fid_and_refuses_a_stale_file(tmp_path):
    import torch

    from pipeline.checkpoints import BestStudent, best_row

    net = torch.nn.Linear(2, 2)
    best, rows = BestStudent(tmp_path), []
    for step, fid in [(1, 50.0), (2, 40.0), (3, 45.0), (4, 40.0)]:
        with torch.no_grad():
            net.weight.fill_(step)
        kept = best.offer(net, fid, step, rows)
        assert kept == (step in (1, 2, 4))  # a tie keeps the later weights
        rows.append({"step": step, "proxy_fid": fid})
    assert best_row(rows) == {"step": 4, "proxy_fid": 40.0}
    out = torch.nn.Linear(2, 2)
    assert best.load_into(out, rows) == {"step": 4, "proxy_fid": 40.0}
    assert torch.equal(out.weight, torch.full((2, 2), 4.0))
    # a redone step 4 that scored otherwise (other hardware): the kept file is not the best row's
    with pytest.raises(ValueError, match="lowest proxy FID is 40.0 at step 2, but the weights "
                       "kept in .* are of step 4"):
        best.load_into(out, rows[:3] + [{"step": 4, "proxy_fid": 41.0}])
    with pytest.raises(ValueError, match="logged none"):
        BestStudent(tmp_path / "none").load_into(out, [{"step": 1, "loss": 0.1}])
