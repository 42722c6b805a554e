"""Few-step students: DMD2's multi-step generator, its sampler and its backward simulation.

Yin et al., "Improved Distribution Matching Distillation for Fast Image Synthesis", NeurIPS 2024,
arXiv:2405.14867 (v2), §4.4 ("Multi-step generator" and "Multi-step generator simulation to
avoid training/inference mismatch"); read against the official code's ``sample_backward`` and
``prepare_denoising_data`` (``main/sd_unified_model.py``).

Sampling. An N-step generator G runs on the grid t_0 > … > t_{N−1} = ``step_grid(T, N)``
([999, 749, 499, 249] for N = 4, [999, 499] for N = 2) from pure noise z:
    x_{t_0} = z,   x̂0_i = G(x_{t_i}, t_i, y),   x_{t_{i+1}} = α_{t_{i+1}} x̂0_i + σ_{t_{i+1}} ε_i
with fresh noise ε_i at every step; the sample is x̂0_{N−1}. This is what diffusers'
``LCMScheduler`` computes on that grid once its boundary condition is exactly x̂0
(``components.stock_scheduler``). A student trained for N steps samples with any n that divides
N: the n-step grid is then part of the N-step one (a 4-step student with 1, 2 or 4 steps); other
counts would call it at timesteps it never trained at.

Training by backward simulation (§4.4). The generator's training input at step k is what the
student itself feeds step k at test time: k ~ U{0, …, N − 1}; the student, without gradients,
runs steps 0 … k − 1 from fresh pure noise; its x̂0 is noised to t_k with the batch's noise z
(k = 0: z itself); the method's loss is applied to the student's x̂0 at step k, with gradients.
The simulation's noises are drawn afresh (uncorrelated with z), as in the official code, and the
fake score trains on the same step-k samples. The official code draws one k per iteration and
broadcasts it from rank 0; here k is a function of the iteration alone (``simulated_step``), so
every process and micro-batch runs the same number of student forwards (FSDP2's collectives
need it) and a resumed run draws the same k.

What the analytic tier shows. The fake score (or LoRA teacher) sees the samples of every step
pooled, as in the official code, so the objective matches their mixture to the target. On the
analytic tier each step's samples are Gaussian, and with an exact fake score that would force
every step to the target (a mixture of Gaussians is a Gaussian only when its parts are equal);
but that tier's fake score is itself a Gaussian family, whose fit of the mixture can equal the
target while the steps compensate for each other. Measured on
the planar problem (2-core CPU, seed 0, the tier's settings plus ``generator_steps: 4``): SiD-LSG
after 1,500 iterations has step variances (first coordinate) 0.013–0.054 at step 0 and
0.40–0.52 at steps 1–3 against the target's 0.30, and its 4-step samples miss the target mean by
0.061 and the covariance by 0.147 (the tier's tolerances: 0.15, 0.08); DMD2 after 3,000
iterations misses by 0.268 and 0.228, its one-step student after 1,500 by 0.018 and 0.040. A fake score expressive
enough for the pooled steps (per class a mixture of four Gaussians, closed form, trained by the
same ε-MSE; fake learning rate 3e-2, which brings the one-step DMD2 student to 0.024 and 0.036)
did not change that: DMD2's 4-step samples then missed by 0.436 and 0.127 after 3,000
iterations, SiD-LSG's by 0.132 and 0.101 after 1,500 (same machine and settings). So that tier
cannot show a 4-step student reaching the target; the tests here check the sampler and the
simulation exactly, and a tiny-tier run trains and resumes a 4-step student.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from components.diffusion import Denoiser, predict_x0

# fresh standard-normal noise shaped, placed and typed like its argument
NoiseFn = Callable[[torch.Tensor], torch.Tensor]


def trailing_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """The N-step grid ``round(T (N − i) / N) − 1``: [999], [999, 499], [999, 749, 499, 249].
    The 2N-step grid contains the N-step one, as progressive distillation needs."""
    return [round(num_timesteps * (steps - i) / steps) - 1 for i in range(steps)]


def step_grid(num_timesteps: int, steps: int) -> list[int]:
    """DMD2's N-step grid ``T − 1, T − 1 − T/N, …`` (the official ``denoising_step_list``);
    N must divide T so that every step is T/N timesteps long."""
    if steps < 1 or num_timesteps % steps:
        raise ValueError(f"a few-step generator needs a step count that divides the teacher's "
                         f"{num_timesteps} timesteps (e.g. 1, 2 or 4), got {steps}")
    return trailing_timesteps(num_timesteps, steps)


def check_generator_steps(steps: int, one_step_t: int, default_t: int,
                          t_key: str = "generator_t") -> None:
    """A method config's ``generator_steps`` and its one-step timestep ``t_key``: at least one
    step, and a few-step generator starts at t = 999, so ``t_key`` keeps its default there."""
    if steps < 1:
        raise ValueError(f"generator_steps must be at least 1, got {steps}")
    if steps > 1 and one_step_t != default_t:
        raise ValueError(f"{t_key} ({one_step_t}) is the one-step generator's timestep; a "
                         "few-step generator (generator_steps > 1) starts at t = 999: drop "
                         f"{t_key} or set generator_steps: 1")


def divisor_steps(steps: int) -> list[int]:
    """The step counts an N-step student samples with: the divisors of N (their grids lie on
    the N-step grid)."""
    return [n for n in range(1, steps + 1) if steps % n == 0]


def _at(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


def multistep_x0(denoiser: Denoiser, z: torch.Tensor, cond: Any, grid: list[int],
                 noise: NoiseFn) -> torch.Tensor:
    """DMD2's multi-step sample (B, ...) from pure noise z on ``grid``: x̂0 at each step,
    re-noised to the next timestep with ``noise(x̂0)`` (differentiable through ``denoiser``)."""
    x0 = predict_x0(denoiser, z, _at(grid[0], z), cond)
    for t in grid[1:]:
        x_t = denoiser.schedule.add_noise(x0, noise(x0), _at(t, x0))
        x0 = predict_x0(denoiser, x_t, _at(t, x0), cond)
    return x0


def simulated_step(iteration: int, steps: int) -> int:
    """The step k ~ U{0, …, N − 1} that iteration ``iteration`` trains, the same on every
    process and micro-batch and in a resumed run."""
    gen = torch.Generator().manual_seed(iteration)
    return int(torch.randint(0, steps, (1,), generator=gen))


def backward_simulated_x0(student: Denoiser, z: torch.Tensor, cond: Any, grid: list[int],
                          k: int, noise: NoiseFn) -> torch.Tensor:
    """The student's x̂0 (B, ...) at step ``k`` of ``grid``, its input simulated by the student
    itself: steps 0 … k − 1 without gradients from fresh noise, then noised to ``grid[k]`` with
    the batch noise z (k = 0: z). Differentiable through the last call only (DMD2 §4.4)."""
    x_in = z
    if k > 0:
        with torch.no_grad():
            x0 = multistep_x0(student, noise(z), cond, grid[:k], noise)
        x_in = student.schedule.add_noise(x0, z, _at(grid[k], z))
    return predict_x0(student, x_in, _at(grid[k], z), cond)
