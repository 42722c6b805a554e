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
    z = torch.randn(b.z.shape, generator=b.generator)
    x_g = one_step_x0(m.G_theta, z, b.cond, m.spec)
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
    b = batch(4, x1=torch.zeros(4, 2), step=5)
    for p in m.v.parameters():  # the 2-RF at the end of phase 1 differs from the teacher
        p.data.add_(0.5)
    m._freeze_2rf(5)
    assert all(torch.equal(a, b) for a, b in zip(m.rf2.parameters(), m.v.parameters()))
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

    m.round_teacher.load_state_dict(m.eta.state_dict())
    wv = torch.full((4,), w)
    z_t = torch.randn(4, 2)
    x_tilde = m.two_step_target(z_t, 999, 749, 499, b.cond, wv)
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
