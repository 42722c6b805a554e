"""Few-step students (``components.few_step``): DMD2's grid, which step counts a student samples
with, and the backward simulation the score methods train on (DMD2 arXiv:2405.14867 §4.4)."""

from __future__ import annotations

import pytest
import torch

from components.analytic import class_conditioning
from components.config import from_dict
from components.diffusion import predict_x0
from components.few_step import backward_simulated_x0, simulated_step, step_grid
from components.generation import GeneratorSpec, generate_latents, sampling_steps, with_steps
from components.methods import get_method
from tests.analytic_cases import PROBLEMS, build


def test_grid_is_dmd2s_denoising_step_list():
    # the official code's list(range(999, 0, -(1000 // N)))
    for n in (1, 2, 4, 8):
        assert step_grid(1000, n) == list(range(999, 0, -(1000 // n)))
    assert step_grid(1000, 4) == [999, 749, 499, 249] and step_grid(1000, 2) == [999, 499]
    with pytest.raises(ValueError, match="divides the teacher's 1000 timesteps.*got 3"):
        step_grid(1000, 3)


def test_a_student_samples_with_the_divisors_of_its_steps_only():
    four = GeneratorSpec(steps=4)
    assert sampling_steps(four) == [1, 2, 4] and with_steps(four, 2).steps == 2
    assert with_steps(four, None) is four
    with pytest.raises(ValueError, match=r"trained for 4 step\(s\) and samples with steps in "
                                         r"\[1, 2, 4\].*not 3"):
        with_steps(four, 3)
    assert sampling_steps(GeneratorSpec(t=625, input_scale="sigma")) == [1]
    assert sampling_steps(GeneratorSpec(kind="ddim", steps=4)) == [4]  # Meng: its own only
    with pytest.raises(ValueError, match="input_scale must be 'unit'"):
        GeneratorSpec(steps=4, input_scale="sigma")


def test_few_step_generation_needs_its_noise_source():
    net = PROBLEMS["planar"].teacher().network()
    with pytest.raises(ValueError, match="re-noises between its steps: pass noise="):
        generate_latents(net, torch.randn(2, 2), class_conditioning(torch.tensor([0, 1]), 3),
                         GeneratorSpec(steps=4))


def test_every_step_is_trained_and_k_is_a_function_of_the_iteration():
    ks = [simulated_step(i, 4) for i in range(800)]
    assert ks == [simulated_step(i, 4) for i in range(800)]  # every process, every resume
    counts = torch.bincount(torch.tensor(ks), minlength=4)
    assert counts.min() > 150, counts  # about 200 each


def test_backward_simulation_is_the_students_own_sampler_and_only_its_last_step_trains():
    """At step k the input is the student's own k-step sample, re-noised with the batch noise z,
    and the gradient is that of the last call alone: the same as x̂0 at t_k of that fixed
    input."""
    P = PROBLEMS["planar"]
    net = P.teacher().network().requires_grad_(True)
    torch.nn.init.normal_(net.head.weight, std=0.1)  # the hyper-network must matter
    cond = class_conditioning(torch.tensor([0, 1, 2, 1]), P.K)
    z = torch.randn(4, P.dim, generator=torch.Generator().manual_seed(1))
    grid = step_grid(1000, 4)
    for k in range(4):
        fresh = torch.Generator().manual_seed(7)
        x0 = backward_simulated_x0(net, z, cond, grid, k,
                                   lambda x, g=fresh: torch.randn(x.shape, generator=g))
        got = torch.autograd.grad(x0.square().sum(), list(net.parameters()))
        gen = torch.Generator().manual_seed(7)  # replay the simulation's fresh noises
        x = torch.randn(z.shape, generator=gen)
        with torch.no_grad():
            for i in range(k):
                prev = predict_x0(net, x, torch.full((4,), grid[i]), cond)
                x = net.schedule.add_noise(prev, torch.randn(z.shape, generator=gen),
                                           torch.full((4,), grid[i + 1]))
            x_in = z if k == 0 else net.schedule.add_noise(prev, z, torch.full((4,), grid[k]))
        want_x0 = predict_x0(net, x_in, torch.full((4,), grid[k]), cond)
        want = torch.autograd.grad(want_x0.square().sum(), list(net.parameters()))
        torch.testing.assert_close(x0, want_x0, rtol=0, atol=0)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["swiftbrush", "sid_lsg", "dmd2"])
def test_score_methods_build_few_step_students_and_refuse_bad_step_counts(name):
    P = PROBLEMS["planar"]
    assert build(name, P, 10, {"generator_steps": 4}).spec == GeneratorSpec(steps=4)
    with pytest.raises(ValueError, match="got 3"):
        build(name, P, 10, {"generator_steps": 3})
    cfg_cls, _ = get_method(name)
    with pytest.raises(ValueError, match="generator_steps must be at least 1"):
        from_dict(cfg_cls, {"generator_steps": 0}, name)
    if name != "sid_lsg":
        with pytest.raises(ValueError, match="generator_t .500. is the one-step generator's"):
            from_dict(cfg_cls, {"generator_steps": 4, "generator_t": 500}, name)
