"""Rectified-flow schedules and the conversions between prediction types, against diffusers'
own scheduler where it defines the numbers."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from components.diffusion import (
    NoiseSchedule,
    eps_from_flow,
    flow_from_eps_x0,
    flow_from_v,
    predict_velocity,
    to_eps,
    to_x0,
    v_from_eps_x0,
    v_from_flow,
    x0_from_flow,
)
from components.generation import ddim_sample, rectified_flow_sample
from components.schedules import (
    FlowSchedule,
    flow_sigma,
    flow_timestep,
    resolution_shift,
    schedule_from_scheduler,
    shift_sigma,
    unshift_sigma,
)


def test_integer_timesteps_are_the_schedulers_training_table():
    """Index i ↔ σ = shift((i + 1) / T): diffusers' table (stored from σ = 1 down)."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours = FlowSchedule.from_scheduler(scheduler)
    assert ours == FlowSchedule(3.0, 1000)
    t = torch.arange(1000)
    torch.testing.assert_close(ours.sigma(t).float(), scheduler.sigmas.flip(0), rtol=1e-6,
                               atol=1e-6)
    torch.testing.assert_close(ours.model_timestep(t), scheduler.timesteps.flip(0), rtol=1e-6,
                               atol=1e-3)
    assert ours.sigma(torch.tensor([999])).item() == 1.0  # t = T − 1 is pure noise


def test_resolution_shift_matches_flux():
    """FLUX's μ (calculate_shift) and the exponential time shift of set_timesteps(mu=μ)."""
    for seq_len in (256, 1024, 4096):
        assert math.isclose(math.log(resolution_shift(seq_len)), calculate_shift(seq_len),
                            rel_tol=1e-9)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15)
    mu = calculate_shift(1024)
    scheduler.set_timesteps(8, mu=mu)
    base = torch.linspace(1.0, 1.0 / 1000, 8, dtype=torch.float64)
    torch.testing.assert_close(shift_sigma(base, math.exp(mu)).float(), scheduler.sigmas[:-1],
                               rtol=1e-5, atol=1e-6)
    ours = FlowSchedule.from_scheduler(scheduler, image_seq_len=1024)
    assert math.isclose(ours.shift, math.exp(mu))
    with pytest.raises(ValueError, match="token count"):
        FlowSchedule.from_scheduler(scheduler)


def test_timestep_sigma_round_trip():
    t = torch.rand(50, dtype=torch.float64) * 1000 - 1.0  # continuous, [−1, 999]
    for k in (1.0, 3.0, 0.7):
        torch.testing.assert_close(flow_timestep(flow_sigma(t, k), k), t)
        s = torch.rand(50, dtype=torch.float64)
        torch.testing.assert_close(unshift_sigma(shift_sigma(s, k), k), s)
    schedule = FlowSchedule(3.0)
    torch.testing.assert_close(schedule.timestep(schedule.sigma(t)), t)


def test_schedule_comes_from_the_pipelines_scheduler():
    vp = schedule_from_scheduler(DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                               beta_end=0.012))
    assert isinstance(vp, NoiseSchedule)
    torch.testing.assert_close(vp.alphas_cumprod, NoiseSchedule.scaled_linear().alphas_cumprod,
                               rtol=1e-6, atol=0)  # the scheduler computes its table in fp32
    assert schedule_from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0)).shift == 3.0
    with pytest.raises(ValueError, match="not supported"):
        FlowSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True))


def _noised(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    t = torch.tensor([0, 100, 400, 700, 998, 999])
    alpha, sigma = FlowSchedule(3.0).alpha_sigma(t, x0)
    return x0, eps, alpha, sigma, alpha * x0 + sigma * eps


def test_flow_conversions_recover_eps_and_x0():
    x0, eps, alpha, sigma, x_t = _noised()
    u = flow_from_eps_x0(eps, x0)
    torch.testing.assert_close(x0_from_flow(x_t, u, alpha, sigma), x0)
    torch.testing.assert_close(eps_from_flow(x_t, u, alpha, sigma), eps)
    torch.testing.assert_close(to_x0(u, "flow", x_t, alpha, sigma), x0)
    torch.testing.assert_close(to_eps(u, "flow", x_t, alpha, sigma), eps)
    v = v_from_eps_x0(eps, x0, alpha, sigma)
    torch.testing.assert_close(v_from_flow(x_t, u, alpha, sigma), v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flow_from_v(x_t, v, alpha, sigma), u, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="epsilon, sample, v_prediction, flow"):
        to_eps(u, "velocity", x_t, alpha, sigma)


def test_conversions_hold_on_the_vp_schedule_too():
    """The flow conversions take (α, σ): on the VP table (α + σ ≠ 1) they still invert."""
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    alpha, sigma = NoiseSchedule.scaled_linear().alpha_sigma(torch.tensor([0, 300, 600, 999]), x0)
    x_t, u = alpha * x0 + sigma * eps, eps - x0
    torch.testing.assert_close(x0_from_flow(x_t, u, alpha, sigma), x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps_from_flow(x_t, u, alpha, sigma), eps, rtol=1e-5, atol=1e-5)


class _PointMassFlow(torch.nn.Module):
    """The exact velocity of data concentrated at ``x0``: u = (x_t − x0) / σ."""

    prediction_type = "flow"

    def __init__(self, x0: torch.Tensor, schedule: FlowSchedule):
        super().__init__()
        self.x0, self.schedule = x0, schedule

    def forward(self, x_t, t, cond):
        _, sigma = self.schedule.alpha_sigma(t, x_t)
        return (x_t - self.x0) / sigma


def test_velocity_direction_and_samplers_on_a_flow():
    """From noise to data, InstaFlow's velocity is −u; one Euler step and the DDIM sampler
    (the flow's Euler sampler) both land on a point mass exactly."""
    x0 = torch.tensor([[1.0, -2.0, 0.5]])
    net = _PointMassFlow(x0, FlowSchedule(3.0))
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    u = net(z, torch.full((5,), 999), None)
    torch.testing.assert_close(predict_velocity(net, z, 0.0, None), -u)
    torch.testing.assert_close(rectified_flow_sample(net, z, None, 1), x0.expand(5, 3))
    out = ddim_sample(net, z, None, None, 4, 1.0)
    torch.testing.assert_close(out, x0.expand(5, 3), rtol=1e-5, atol=1e-5)
