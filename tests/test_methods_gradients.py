"""Analytic tier: each method's loss gradient on a hand-made case equals the paper's formula.

The hand computations use the Gaussian closed forms, not the methods' code paths: for data
``N(m, Σ)`` the x0-posterior mean is ``E[x0 | x_t] = m + α_t Σ A_t⁻¹ (x_t − α_t m)`` with
``A_t = α_t² Σ + σ_t² I``, linear in x_t. Random draws are replayed from the batch generator in
the order each method makes them.
"""

from __future__ import annotations

import torch

from components.analytic import GaussianClassTeacher, class_conditioning, null_conditioning
from components.config import from_dict
from components.diffusion import NoiseSchedule
from components.generation import one_step_x0
from components.methods import Batch, Teacher, get_method

K = 3
MEANS = torch.tensor([[1.5, 0.0], [-0.75, 1.3], [-0.75, -1.3]])
COV = torch.tensor([[0.30, 0.08], [0.08, 0.20]])
SCHEDULE = NoiseSchedule.scaled_linear()


def build(name: str, settings: dict, steps: int = 10):
    cfg_cls, factory = get_method(name)
    teacher = GaussianClassTeacher(MEANS, COV)
    return factory(from_dict(cfg_cls, settings, name), Teacher(teacher.network()), steps)


def batch(seed: int, labels=(0, 1, 2, 0), x1=None, step: int = 0) -> Batch:
    B = len(labels)
    z = torch.randn(B, 2, generator=torch.Generator().manual_seed(100 + seed))
    return Batch(class_conditioning(torch.tensor(labels), K), null_conditioning(B, K), z,
                 torch.Generator().manual_seed(seed), step, x1)


def posterior_x0(x_t, t, mean, cov):
    """E[x0 | x_t] for x0 ~ N(mean (B, d), cov), per row."""
    alpha, sigma = SCHEDULE.alpha_sigma(t, x_t)
    A = alpha[:, :, None] ** 2 * cov + sigma[:, :, None] ** 2 * torch.eye(2)
    r = torch.linalg.solve(A, (x_t - alpha * mean)[..., None])[..., 0]
    return mean + alpha * (r @ cov.T)


def guided_mean(labels, s):
    null = MEANS.mean(0)
    return null + s * (MEANS[torch.tensor(labels)] - null)


def grads(module):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for p in module.parameters()]


def test_dmd2_gradient_is_the_normalised_score_difference():
    """∂L/∂x = (x̂_fake − x̂_real) / mean|x − x̂_real| / (B d)  (DMD2's gradient, code normalisation)."""
    m = build("dmd2", {"real_guidance_scale": 2.0})
    fake_mean = MEANS + torch.tensor([0.4, -0.3])  # the fake score: a shifted Gaussian family
    with torch.no_grad():
        m.mu_fake.means.weight[:, :K] = fake_mean.T
    b = batch(3)
    per_sample, _ = m.distribution_matching_loss(b, {})
    per_sample.mean().backward()
    got = grads(m.G_theta)
    m.G_theta.zero_grad()

    b = batch(3)
    x = one_step_x0(m.G_theta, b.z, b.cond, m.spec)
    t = torch.randint(20, 981, (4,), generator=b.generator)
    eps = torch.randn(x.shape, generator=b.generator)
    with torch.no_grad():
        x_t = SCHEDULE.add_noise(x, eps, t)
        x_real = posterior_x0(x_t, t, guided_mean((0, 1, 2, 0), 2.0), COV)
        x_fake = posterior_x0(x_t, t, fake_mean[torch.tensor([0, 1, 2, 0])], COV)
        g = (x_fake - x_real) / (x - x_real).abs().mean(1, keepdim=True)
    x.backward(g / x.numel())
    for a, e in zip(got, grads(m.G_theta)):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-6)


def test_sid_gradient_flows_through_both_scores():
    """L = ω (y_r − y_f)ᵀ[(y_r − x_g) − α (y_r − y_f)] with y = R x_t + r, y_f = F x_t + f:
    ∂L/∂x_g = ω[α (R − F)ᵀ e + (α R − I − α_sid α (R − F))ᵀ d]  (SiD-LSG, no stop-grad)."""
    a_sid = 1.2
    m = build("sid_lsg", {"alpha": a_sid, "fake_train_guidance": 1.0, "fake_eval_guidance": 1.0,
                          "real_eval_guidance": 1.0})
    fake_cov = torch.tensor([[0.5, 0.0], [0.0, 0.4]])
    with torch.no_grad():
        m.f_psi.cov.weight.copy_(torch.linalg.cholesky(fake_cov))
    b = batch(5)
    per_sample, _ = m.generator_loss(b)
    per_sample.mean().backward()
    got = grads(m.G_theta)
    m.G_theta.zero_grad()

    b = batch(5)
    x_g = one_step_x0(m.G_theta, b.z, b.cond, m.spec)  # the generator step's own batch
    t = torch.randint(20, 980, (4,), generator=b.generator)
    eps = torch.randn(x_g.shape, generator=b.generator)
    means = MEANS[torch.tensor([0, 1, 2, 0])]
    xg = x_g.detach()
    alpha, _ = SCHEDULE.alpha_sigma(t, xg)
    x_t = SCHEDULE.add_noise(xg, eps, t)
    y_r, y_f = posterior_x0(x_t, t, means, COV), posterior_x0(x_t, t, means, fake_cov)

    def jac(cov):  # ∂y/∂x_t = α Σ A⁻¹, per row
        rows = []
        for i in range(4):
            a_i = alpha[i, 0]
            A = a_i**2 * cov + (1 - a_i**2) * torch.eye(2)
            rows.append(a_i * cov @ torch.linalg.inv(A))
        return torch.stack(rows)
    R, F = jac(COV), jac(fake_cov)
    d = y_r - y_f
    e = (y_r - xg) - a_sid * d
    omega = 1.0 / (xg - y_r).abs().mean(1, keepdim=True)
    a = alpha[:, :, None]
    dd = a * (R - F)
    de = a * R - torch.eye(2) - a_sid * a * (R - F)
    hand = omega * ((dd.transpose(1, 2) @ e[..., None]) + (de.transpose(1, 2) @ d[..., None]))[..., 0]
    x_g.backward(hand / 4)
    for got_p, exp_p in zip(got, grads(m.G_theta)):
        torch.testing.assert_close(got_p, exp_p, rtol=2e-3, atol=1e-6)


def test_instaflow_reflow_regresses_the_straight_line_velocity():
    """L = ‖(X1 − X0) − v(τ X1 + (1 − τ) X0, 1000 (1 − τ))‖² (InstaFlow's reflow loss)."""
    m = build("instaflow", {"lpips_fraction": 0.0, "null_prompt_prob": 0.0}, steps=10)
    x1 = torch.randn(4, 2, generator=torch.Generator().manual_seed(9)) + 3.0
    b = batch(2, x1=x1)
    per_sample, _ = m.reflow_loss(b)
    b = batch(2, x1=x1)
    tau = torch.rand(4, generator=b.generator)
    torch.rand(4, generator=b.generator)  # the prompt-dropout draw
    x_tau = tau[:, None] * x1 + (1 - tau[:, None]) * b.z
    with torch.no_grad():
        v = m.v(x_tau, 1000.0 * (1.0 - tau), b.cond)
    torch.testing.assert_close(per_sample.detach(), (((x1 - b.z) - v) ** 2).mean(1))


def test_instaflow_distillation_target_is_the_frozen_flows_euler_solution():
    """Phase 2 starts by freezing the 2-RF; its target is that flow's guided Euler solution."""
    m = build("instaflow", {"lpips_fraction": 0.0, "distill_ode_steps": 3,
                            "distill_guidance": 1.5, "reflow_fraction": 0.5}, steps=10)
    assert m.phase_starts == (5,)
    b = batch(4, x1=torch.zeros(4, 2), step=5)
    with torch.no_grad():
        m.v.head.bias.add_(0.1)  # the 2-RF differs from the teacher the frozen copy started as
    m.begin_phase(5)
    for k, v in m.v.state_dict().items():
        torch.testing.assert_close(m.rf2.state_dict()[k], v)
    with torch.no_grad():
        x = b.z
        for i in range(3):
            t = torch.full((4,), 1000.0 * (1 - i / 3))
            v_u, v_c = m.v(x, t, b.uncond), m.v(x, t, b.cond)
            x = x + (v_u + 1.5 * (v_c - v_u)) / 3
        torch.testing.assert_close(m._rf2_solution(b.z, b), x, rtol=1e-5, atol=1e-6)


def test_meng_targets():
    """Stage 1: (1 + w) x̂_c − w x̂_u is the exact x0 of the s = 1 + w guided Gaussian.
    Stage 2: the student's single DDIM step t → t'' from x̃ lands on the teacher's two steps."""
    from components.diffusion import apply_guidance_weight, predict_x0
    from components.generation import ddim_step

    m = build("meng", {"w_dim": 8, "start_steps": 4})
    b = batch(1)
    x_t = torch.randn(4, 2)
    t = torch.tensor([10, 300, 600, 900])
    w = 1.5
    with torch.no_grad():
        guided = apply_guidance_weight(predict_x0(m.theta, x_t, t, b.uncond),
                                       predict_x0(m.theta, x_t, t, b.cond), w)
    torch.testing.assert_close(guided, posterior_x0(x_t, t, guided_mean((0, 1, 2, 0), 1 + w),
                                                    COV), rtol=1e-4, atol=1e-5)

    m.begin_phase(m.phase_starts[0])
    wv = torch.full((4,), w)
    z_t = torch.randn(4, 2)
    full = torch.full((4,), 1, dtype=torch.long)
    x_tilde = m.two_step_target(z_t, 999 * full, 749 * full, 499 * full, b.cond, wv)
    with torch.no_grad():
        z = z_t
        for t_from, t_to in ((999, 749), (749, 499)):
            tb = torch.full((4,), t_from)
            x0 = m._student_x0(m.round_teacher, z, tb, b.cond, wv)
            a, s = SCHEDULE.alpha_sigma(tb, z)
            z = ddim_step(z, x0, (z - a * x0) / s, t_to, SCHEDULE)
        a, s = SCHEDULE.alpha_sigma(torch.full((4,), 999), z_t)
        one_step = ddim_step(z_t, x_tilde, (z_t - a * x_tilde) / s, 499, SCHEDULE)
    torch.testing.assert_close(one_step, z, rtol=1e-4, atol=1e-5)


def _first_call_inputs(module: torch.nn.Module) -> list:
    """The positional inputs of ``module``'s calls, recorded by a forward pre-hook."""
    calls: list = []
    module.register_forward_pre_hook(lambda _m, args: calls.append(args))
    return calls


def test_sid_fake_step_generates_the_dropped_samples_from_the_empty_prompt():
    """The official loop replaces the prompt before G runs: dropped samples are G(z, ∅)."""
    m = build("sid_lsg", {"fake_train_guidance": 2.0, "null_prompt_prob": 1.0})
    calls = _first_call_inputs(m.G_theta)
    b = batch(3)
    m.fake_score_loss(b)
    torch.testing.assert_close(calls[0][2].text, b.uncond.text)


def test_sid_generator_step_has_its_own_batch():
    m = build("sid_lsg", {})
    assert [g.fresh_batch for g in m.groups] == [False, True]


def test_instaflow_distillation_starts_from_fresh_noise():
    """Phase 2 draws X0 from the iteration's generator, never the pair cache's noise z."""
    m = build("instaflow", {"lpips_fraction": 0.0, "distill_ode_steps": 2,
                            "reflow_fraction": 0.5}, steps=10)
    m.begin_phase(5)
    calls = _first_call_inputs(m.rf2)
    b = batch(7, x1=torch.zeros(4, 2), step=5)
    m.distill_loss(b)
    x0 = calls[0][0][:4]
    expected = torch.randn(b.z.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(x0, expected)
    assert not torch.allclose(x0, b.z)


def test_instaflow_freezes_the_ema_of_reflow_as_its_2rf(tmp_path):
    """Through the loop: at the phase boundary the frozen 2-RF is phase 1's EMA, not the raw
    weights."""
    from components.batches import PairBatches
    from components.training import LoopConfig, train

    m = build("instaflow", {"lpips_fraction": 0.0, "distill_ode_steps": 2, "lr": 1e-2,
                            "warmup_steps": 0, "reflow_fraction": 0.5}, steps=8)

    class Pairs:
        x1 = torch.randn(4, 2, generator=torch.Generator().manual_seed(3)) + 2.0

        def __len__(self):
            return 4

        def prompts(self, idx):
            return torch.tensor([0, 1, 2, 0])[idx]

        def samples(self, idx, dtype=torch.float32):
            return self.x1[idx].to(dtype)

        def guidance(self, idx):
            return None

        def noise(self, idx):
            return torch.randn(len(idx), 2, generator=torch.Generator().manual_seed(4))

    table, null = class_conditioning(torch.arange(K), K), null_conditioning(1, K)
    at_boundary = {}

    def on_sample(net, step):
        if step == 4:
            at_boundary.update({k: v.clone() for k, v in net.state_dict().items()})

    raw_at_boundary = {}
    begin_phase = m.begin_phase

    def recording_begin_phase(step):
        raw_at_boundary.update({k: v.clone() for k, v in m.v.state_dict().items()})
        begin_phase(step)
    m.begin_phase = recording_begin_phase
    loop = LoopConfig(steps=8, batch_size=4, log_every=100, sample_every=4, checkpoint_every=100)
    train(m, PairBatches(table, null, Pairs(), (2,)), loop, tmp_path, lambda *a: None, on_sample)
    for k, v in at_boundary.items():
        torch.testing.assert_close(m.rf2.state_dict()[k], v)
        torch.testing.assert_close(raw_at_boundary[k], v)  # the student restarted there too


def test_meng_draws_a_grid_step_per_sample_and_restarts_every_round():
    m = build("meng", {"w_dim": 8, "start_steps": 8, "stage1_fraction": 0.25}, steps=40)
    assert m.phase_starts == (10, 20, 30)  # stage 2 begins, then each halving round
    assert {g.optimizer_name for g in m.groups} == {"student"}
    m.begin_phase(10)
    calls = _first_call_inputs(m.round_teacher)
    b = batch(11, labels=tuple(range(3)) * 6, x1=torch.zeros(18, 2), step=10)
    m.progressive_loss(b)
    t = calls[0][1]
    assert len(t.unique()) > 1  # Alg. 2 draws t per example
    assert set(t.tolist()) <= {999, 749, 499, 249}  # the 4-step grid of round 0


def test_meng_trains_each_pair_at_the_guidance_it_was_sampled_with():
    """A pair sampled at CFG scale s trains the student at w = s − 1; the cache's scales reach
    the batch (and its micro-batches) row by row."""
    from components.batches import PairBatches

    scales = torch.tensor([1.0, 2.0, 3.5, 1.25, 2.75])

    class Pairs:
        def __len__(self):
            return 5

        def prompts(self, idx):
            return torch.tensor([0, 1, 2, 0, 1])[idx]

        def samples(self, idx, dtype=torch.float32):
            return torch.zeros(len(idx), 2, dtype=dtype)

        def guidance(self, idx):
            return scales[idx]

        def noise(self, idx):
            return torch.zeros(len(idx), 2)

    m = build("meng", {"w_dim": 8})
    assert m.cfg.pair_guidance_range() == (1 + m.cfg.w_min, 1 + m.cfg.w_max)
    table, null = class_conditioning(torch.arange(K), K), null_conditioning(1, K)
    b = PairBatches(table, null, Pairs(), (2,))(8, torch.Generator().manual_seed(0))
    torch.testing.assert_close(m._draw_w(b), b.x1_guidance - 1.0)
    assert set(b.x1_guidance.tolist()) <= set(scales.tolist())
    torch.testing.assert_close(b.rows(slice(2, 5)).x1_guidance, b.x1_guidance[2:5])
