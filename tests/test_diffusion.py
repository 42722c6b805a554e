"""Analytic tier: the diffusion math against closed forms and diffusers' own scheduler."""

from __future__ import annotations

import math

import torch
from diffusers import DDPMScheduler

from components.diffusion import (
    NoiseSchedule,
    apply_guidance_scale,
    apply_guidance_weight,
    eps_from_v,
    guidance_scale_to_weight,
    guidance_weight_to_scale,
    guided_eps,
    to_eps,
    to_x0,
    v_from_eps_x0,
)
from components.generation import GeneratorSpec, ddim_sample, one_step_x0, seeded_noise


class GaussianDenoiser:
    """Exact ε-prediction for data x0 ~ N(m_c, s² I) with class-conditional mean m_c.

    E[ε | x_t] = σ_t (x_t − α_t m) / (α_t² s² + σ_t²): the closed-form posterior mean of ε.
    """

    prediction_type = "epsilon"

    def __init__(self, means: torch.Tensor, std: float, schedule: NoiseSchedule):
        self.means, self.std, self.schedule = means, std, schedule

    def __call__(self, x_t, t, cond):
        alpha, sigma = self.schedule.alpha_sigma(t, x_t)
        m = self.means[cond]
        return sigma * (x_t - alpha * m) / (alpha**2 * self.std**2 + sigma**2)


def test_schedule_matches_diffusers_scaled_linear():
    ours = NoiseSchedule.scaled_linear()
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    theirs = NoiseSchedule.from_scheduler(sched)
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=1e-6, atol=0)
    # methods-reference: ᾱ_999 = 0.00466 (the code's hard-coded 0.0047), ᾱ_625 = 0.1378
    assert abs(ours.alphas_cumprod[999].item() - 0.00466) < 5e-5
    assert abs(ours.alphas_cumprod[625].item() - 0.1378) < 5e-4


def test_eps_x0_v_conversions_round_trip():
    torch.manual_seed(0)
    x0, eps = torch.randn(3, 4), torch.randn(3, 4)
    sched = NoiseSchedule.scaled_linear()
    t = torch.tensor([10, 500, 990])
    alpha, sigma = sched.alpha_sigma(t, x0.double())
    alpha, sigma = alpha.float(), sigma.float()
    x_t = alpha * x0 + sigma * eps
    v = v_from_eps_x0(eps, x0, alpha, sigma)
    torch.testing.assert_close(eps_from_v(x_t, v, alpha, sigma), eps, atol=1e-5, rtol=0)
    for kind, pred in [("epsilon", eps), ("sample", x0), ("v_prediction", v)]:
        torch.testing.assert_close(to_eps(pred, kind, x_t, alpha, sigma), eps, atol=1e-4, rtol=0)
        torch.testing.assert_close(to_x0(pred, kind, x_t, alpha, sigma), x0, atol=1e-3, rtol=0)


def test_guidance_conventions_agree_with_s_equal_one_plus_w():
    u, c = torch.randn(5), torch.randn(5)
    for w in (0.0, 0.5, 3.5):
        s = guidance_weight_to_scale(w)
        assert guidance_scale_to_weight(s) == w
        torch.testing.assert_close(apply_guidance_weight(u, c, w), apply_guidance_scale(u, c, s))
    torch.testing.assert_close(apply_guidance_scale(u, c, 1.0), c)


def test_guided_eps_batches_cond_and_uncond_like_two_calls():
    sched = NoiseSchedule.scaled_linear()
    den = GaussianDenoiser(torch.tensor([[2.0, 0.0], [-2.0, 1.0], [0.0, 0.0]]), 0.5, sched)
    x = torch.randn(2, 2)
    t = torch.tensor([300, 700])
    cond, uncond = torch.tensor([0, 1]), torch.tensor([2, 2])
    expected = apply_guidance_scale(den(x, t, uncond), den(x, t, cond), 3.0)
    torch.testing.assert_close(guided_eps(den, x, t, cond, uncond, 3.0), expected)


def test_exact_denoiser_ddim_lands_on_the_class_mean():
    """With the exact score of a narrow Gaussian, 50-step DDIM samples concentrate at its mean."""
    sched = NoiseSchedule.scaled_linear()
    means = torch.tensor([[3.0, -1.0], [0.0, 0.0]])
    den = GaussianDenoiser(means, 0.05, sched)
    z = seeded_noise(range(64), (2,))
    cond = torch.zeros(64, dtype=torch.long)
    out = ddim_sample(den, z.double(), cond, torch.ones(64, dtype=torch.long), 50, 1.0)
    torch.testing.assert_close(out.mean(0).float(), means[0], atol=0.05, rtol=0)
    assert out.std(0).max() < 0.1


def test_one_step_ddim_is_the_x0_generator_at_999():
    sched = NoiseSchedule.scaled_linear()
    den = GaussianDenoiser(torch.tensor([[1.0, 2.0]]), 1.0, sched)
    z = seeded_noise([1, 2, 3], (2,)).double()
    cond = torch.zeros(3, dtype=torch.long)
    via_ddim = ddim_sample(den, z, cond, cond, 1, 1.0)
    via_gen = one_step_x0(den, z, cond, GeneratorSpec(t=999, input_scale="unit"))
    torch.testing.assert_close(via_ddim, via_gen)
    alpha = math.sqrt(sched.alphas_cumprod[999].item())
    assert via_gen.abs().max() < 1.0 / alpha * 10


def test_seeded_noise_ignores_batching():
    whole = seeded_noise([5, 6, 7, 8], (4, 2, 2))
    parts = torch.cat([seeded_noise([5, 6], (4, 2, 2)), seeded_noise([7, 8], (4, 2, 2))])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole[0], whole[1])
