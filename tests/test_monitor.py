"""The training monitor: synthetic metric streams for every check, and a tiny DMD2 run whose
learning rate collapses it (every seed gives the same image) stopped by the monitor in the
real loop, while the same run at a sane learning rate raises nothing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from components.config import ConfigError, from_dict
from components.monitor import Monitor, MonitorConfig, TrainingAlarm, image_statistics


def _stream(monitor: Monitor, rows: list[dict]) -> list[tuple[int, str]]:
    for step, row in enumerate(rows, start=1):
        monitor.observe_samples(row, step * 10)
    return monitor.flags


def _healthy(**over) -> dict:
    return {"monitor_brightness": 0.5, "monitor_saturation": 0.3, "monitor_diversity": 0.1,
            **over}


def test_image_statistics_of_known_images():
    gray = np.full((4, 2, 2, 3), 128, np.uint8)
    stats = image_statistics(gray, prompts=2)
    assert stats["monitor_saturation"] == 0 and stats["monitor_diversity"] == 0
    assert stats["monitor_brightness"] == pytest.approx(128 / 255)
    red = np.zeros((2, 1, 1, 3), np.uint8)
    red[..., 0] = 255
    red[1] = 0  # the second seed of the one prompt: black
    stats = image_statistics(red, prompts=1)
    assert stats["monitor_saturation"] == pytest.approx(0.5)  # red 1, black 0
    assert stats["monitor_diversity"] == pytest.approx(0.5 / 3)  # std 0.5 on one channel of 3


def test_a_healthy_stream_raises_nothing():
    rows = [{**_healthy(monitor_diversity=0.1 - 0.005 * k), "proxy_fid": 200 - k}
            for k in range(10)]
    assert _stream(Monitor(MonitorConfig(action="stop")), rows) == []


@pytest.mark.parametrize("row, reason", [
    (_healthy(monitor_brightness=0.01), "mean brightness 0.010 is outside"),
    (_healthy(monitor_brightness=0.99), "flat black or white"),
    (_healthy(monitor_saturation=0.001), "grey images"),
    (_healthy(monitor_diversity=0.01), "mode collapse: diversity across seeds 0.0100 is 10%"),
])
def test_each_collapse_is_named(row, reason):
    flags = _stream(Monitor(MonitorConfig(), report=lambda _: None), [_healthy(), row])
    assert len(flags) == 1 and flags[0][0] == 20 and reason in flags[0][1]


def test_proxy_fid_divergence_needs_patience_and_names_the_best_step():
    monitor = Monitor(MonitorConfig(fid_rise=0.5, fid_patience=2), report=lambda _: None)
    fids = [300.0, 200.0, 320.0, 250.0, 310.0, 330.0]  # one spike, recovery, then two in a row
    flags = _stream(monitor, [{"proxy_fid": f} for f in fids])
    assert [s for s, _ in flags] == [60]
    assert "proxy FID 330.00 above 300.00" in flags[0][1] and "best 200.00 at step 20" in flags[0][1]
    assert monitor.best == (200.0, 20)


def test_a_non_finite_loss_is_divergence_and_stop_raises_with_the_step():
    monitor = Monitor(MonitorConfig(action="stop"))
    monitor.observe_losses({"loss_dm": 0.3, "grad_norm_g": math.inf}, 5)  # not a loss
    with pytest.raises(TrainingAlarm, match=r"step 10: diverged: loss loss_dm is not finite.*stop"):
        monitor.observe_losses({"loss_dm": math.nan}, 10)


def test_warn_reports_and_off_watches_nothing():
    said = []
    Monitor(MonitorConfig(action="warn"), report=said.append).observe_losses(
        {"loss_x": math.nan}, 3)
    assert len(said) == 1 and said[0].endswith("(distill.monitor.action: warn)")
    off = Monitor(MonitorConfig(action="off"))
    assert _stream(off, [_healthy(), _healthy(monitor_brightness=0.0)]) == []


@pytest.mark.parametrize("section, message", [
    ({"seeds": 1}, "monitor.seeds >= 2"),
    ({"brightness_range": [0.5, 0.2]}, "brightness_range must be"),
    ({"action": "halt"}, "expected one of 'off', 'warn', 'stop'"),
])
def test_bad_monitor_settings_fail_at_load(section, message):
    from pipeline.params import DistillConfig

    with pytest.raises(ConfigError, match=message):
        from_dict(DistillConfig, {"method": "dmd2", "loop": {}, "monitor": section}, "distill")


def _tiny_dmd2_run(tmp_path, lr: float, monitor: Monitor, steps: int) -> None:
    """DMD2 on the tiny pipeline through the real loop, the monitor fed by the loop with the
    statistics of 2 prompts × 4 fixed seeds at every iteration."""
    from components.batches import PromptBatches
    from components.generation import decode_latents, generate_latents, seeded_noise
    from components.methods import Teacher, get_method
    from components.teacher import teacher_denoiser
    from components.training import LoopConfig, train
    from tests.test_methods_tiny import LATENT, _cache
    from tests.tiny import tiny_pipeline

    pipe = tiny_pipeline()
    cache = _cache(tmp_path, pipe)
    cfg_cls, build = get_method("dmd2")
    torch.manual_seed(0)
    method = build(cfg_cls(generator_lr=lr, fake_lr=1e-3, gen_update_ratio=1, warmup_steps=0),
                   Teacher(teacher_denoiser(pipe)), steps)
    cond, z = cache.conditioning(torch.arange(8) % 2), seeded_noise(range(8), LATENT)

    def on_sample(student, step):
        with torch.no_grad():
            images = decode_latents(pipe, generate_latents(student, z, cond, method.spec))
        return image_statistics(images, prompts=2)

    loop = LoopConfig(steps=steps, batch_size=2, log_every=1, sample_every=1,
                      checkpoint_every=steps)
    train(method, PromptBatches.from_cache(cache, LATENT), loop, tmp_path / "ckpt",
          lambda m, s: None, on_sample, monitor=monitor)


def test_a_collapsing_tiny_run_is_stopped_with_reason_and_step(tmp_path):
    # lr 1.0 (measured): diversity across seeds 0.057 after step 1, 0.0023 at step 3
    with pytest.raises(TrainingAlarm, match=r"step [23]: mode collapse") as alarm:
        _tiny_dmd2_run(tmp_path, 1.0, Monitor(MonitorConfig(action="stop")), 6)
    assert "distill.monitor.action: stop" in str(alarm.value)
    assert not (tmp_path / "ckpt" / "step-6").exists()  # stopped before the end


def test_the_same_run_at_a_sane_learning_rate_raises_nothing(tmp_path):
    monitor = Monitor(MonitorConfig(action="stop"))
    _tiny_dmd2_run(tmp_path, 1e-3, monitor, 3)  # lr 1e-3: diversity 0.109 → 0.105 (measured)
    assert monitor.flags == []


def test_a_resumed_monitor_replays_the_earlier_rows_and_goes_on_as_one():
    """The first segment's rows (loss windows and sample rows) rebuild the state: the first
    diversity, the best proxy FID and its strikes carry over, and no flag is reported twice."""
    rows = [{"step": 5, "loss_dm": 0.3},
            {"step": 10, **_healthy(monitor_diversity=0.2), "proxy_fid": 100.0},
            {"step": 15, "loss_dm": math.nan},  # flagged in the first segment
            {"step": 20, **_healthy(monitor_diversity=0.15), "proxy_fid": 160.0},  # strike 1
            {"step": 30, **_healthy(monitor_diversity=0.04), "proxy_fid": 170.0},  # 2: flags
            {"step": 40, **_healthy(monitor_diversity=0.1), "proxy_fid": 90.0}]

    def feed(monitor, part):
        for row in part:
            metrics = {k: v for k, v in row.items() if k != "step"}
            if "proxy_fid" in row:
                monitor.observe_samples(metrics, row["step"])
            else:
                monitor.observe_losses(metrics, row["step"])

    said_once, said_twice = [], []
    whole = Monitor(MonitorConfig(fid_patience=2), report=said_once.append)
    feed(whole, rows)
    resumed = Monitor(MonitorConfig(fid_patience=2), report=said_twice.append)
    resumed.replay(rows[:4])  # killed after step 20, resumed from its checkpoint
    feed(resumed, rows[4:])
    assert resumed.flags == whole.flags and resumed.best == whole.best == (90.0, 40)
    assert [step for step, _ in whole.flags] == [15, 30, 30]  # loss; diversity 20 %; FID
    assert len(said_twice) == 2 and all("step 30" in line for line in said_twice)
    assert resumed.records()[0] == {"step": 15, "reason": whole.flags[0][1]}


def test_replay_never_stops_a_run_that_was_flagged_before():
    monitor = Monitor(MonitorConfig(action="stop"))
    monitor.replay([{"step": 3, "loss_dm": math.inf}])  # e.g. resumed with action warn → stop
    assert monitor.flags == [(3, "diverged: loss loss_dm is not finite")]
    with pytest.raises(TrainingAlarm) as alarm:
        monitor.observe_losses({"loss_dm": math.nan}, 4)
    assert alarm.value.step == 4 and alarm.value.reason == "diverged: loss loss_dm is not finite"
