"""The training loop's semantics on a one-parameter method whose every update is recorded: when the
EMA ticks, what the sampler sees, phases, shared optimizers, fresh batches and the log window."""

from __future__ import annotations

import pytest
import torch

from components.analytic import class_conditioning, null_conditioning
from components.ema import EMAConfig
from components.methods import Batch, GroupSpec
from components.training import LoopConfig, student_updates, train
from tests.threads import one_thread  # noqa: F401  (one torch thread for this module)

HALF = EMAConfig("constant", 0.5)


class Toy:
    """A student ``net`` (one weight, pulled towards 1) and a second network ``other``; every
    student update's resulting weight is recorded, and so is every batch each group saw."""

    needs_pairs = False
    spec = None

    def __init__(self, groups, student_groups, phase_starts=(), ema=HALF):
        self.groups, self.student_groups = tuple(groups), tuple(student_groups)
        self.phase_starts, self.ema = tuple(phase_starts), ema
        self.net, self.other = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.net.weight.fill_(0.0)
            self.other.weight.fill_(0.0)
        self.made: list[str] = []
        self.after_update: list[float] = []  # student weight after each of its updates
        self.seen: dict[str, list[torch.Tensor]] = {}
        self.phases: list[tuple[int, float]] = []

    def _owner(self, name: str) -> str:
        return next(g.name for g in self.groups if g.optimizer_name == name)

    def parameters(self, group):
        return list((self.net if group in self.student_groups else self.other).parameters())

    def make_optimizer(self, name):
        self.made.append(name)
        opt = torch.optim.SGD(self.parameters(self._owner(name)), lr=0.25, momentum=0.9)
        if self._owner(name) in self.student_groups:
            opt.register_step_post_hook(
                lambda *_: self.after_update.append(float(self.net.weight.detach())))
        return opt

    def loss(self, group, batch: Batch, scratch):
        self.seen.setdefault(group, []).append(batch.z.clone())
        net = self.net if group in self.student_groups else self.other
        per_sample = (net.weight.sum() - 1.0) ** 2 * torch.ones(batch.z.shape[0])
        return per_sample, {f"loss_{group}": per_sample.mean()}

    def begin_phase(self, step):
        self.phases.append((step, float(self.net.weight)))

    def student(self):
        return self.net

    def state_modules(self):
        return {"net": self.net, "other": self.other}


class Batches:
    def __init__(self):
        self.calls = 0

    def __call__(self, batch_size, gen, step=0):
        self.calls += 1
        labels = torch.zeros(batch_size, dtype=torch.long)
        return Batch(class_conditioning(labels, 2), null_conditioning(batch_size, 2),
                     torch.randn(batch_size, 1, generator=gen), gen, step)


def run(method, tmp_path, steps=6, log_every=100, on_sample=None, batches=None):
    logs: list = []
    loop = LoopConfig(steps=steps, batch_size=2, log_every=log_every, sample_every=steps,
                      checkpoint_every=10**9)
    ema = train(method, batches or Batches(), loop, tmp_path, lambda m, k: logs.append((k, m)),
                on_sample or (lambda net, k: None))
    return ema, logs


def ema_of(weights: list[float], start: float, cfg: EMAConfig, batch: int = 2) -> float:
    shadow = start
    for n, w in enumerate(weights, start=1):
        beta = cfg.beta(n, batch)
        shadow = beta * shadow + (1 - beta) * w
    return shadow


def test_ema_ticks_only_when_the_student_updated(tmp_path):
    m = Toy([GroupSpec("student", every=3), GroupSpec("fake")], ["student"])
    ema, _ = run(m, tmp_path, steps=6)
    assert len(m.after_update) == 2  # iterations 0 and 3
    assert float(ema.shadow["weight"]) == pytest.approx(ema_of(m.after_update, 0.0, m.ema))
    assert student_updates(m, 6) == 2


def test_sampler_sees_the_ema_weights_and_the_student_keeps_its_own(tmp_path):
    seen = []
    m = Toy([GroupSpec("student")], ["student"])
    run(m, tmp_path, steps=4, on_sample=lambda net, k: seen.append(float(net.weight.detach())))
    assert seen == [pytest.approx(ema_of(m.after_update, 0.0, m.ema))]
    assert float(m.net.weight) == pytest.approx(m.after_update[-1])
    assert seen[0] != pytest.approx(m.after_update[-1])


def test_a_phase_starts_from_the_ema_with_a_fresh_optimizer_and_average(tmp_path):
    cfg = EMAConfig("warmup", 0.9999)
    m = Toy([GroupSpec("a", stop=3, optimizer="s"), GroupSpec("b", start=3, optimizer="s")],
            ["a", "b"], phase_starts=[3], ema=cfg)
    ema, _ = run(m, tmp_path, steps=5)
    assert m.made == ["s", "s"]  # one optimizer for the network, fresh at the phase start
    before = ema_of(m.after_update[:3], 0.0, cfg)
    assert m.phases == [(3, pytest.approx(before))]  # the new phase starts at the old average
    # the average restarted at step 3: warm-up again (β = 0 at its first update)
    assert float(ema.shadow["weight"]) == pytest.approx(ema_of(m.after_update[3:], before, cfg))
    assert student_updates(m, 5) == 2


def test_a_group_with_a_fresh_batch_draws_its_own(tmp_path):
    m = Toy([GroupSpec("fake"), GroupSpec("student", fresh_batch=True)], ["student"])
    batches = Batches()
    run(m, tmp_path, steps=3, batches=batches)
    assert batches.calls == 6
    for a, b in zip(m.seen["fake"], m.seen["student"]):
        assert not torch.equal(a, b)


def test_every_group_is_logged_even_when_it_skipped_the_logged_iteration(tmp_path):
    m = Toy([GroupSpec("student", every=2), GroupSpec("fake")], ["student"])
    _, logs = run(m, tmp_path, steps=4, log_every=2)
    assert [k for k, _ in logs] == [2, 4]
    for _, metrics in logs:  # iterations 1 and 3 had no student update
        assert {"loss_student", "loss_fake", "dropped_student", "dropped_fake"} <= set(metrics)
        assert all(isinstance(v, float) for v in metrics.values())
