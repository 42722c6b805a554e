"""The analytic tier's problems and method settings, shared by its tests.

Two problems: ``planar`` (three 2-D classes with a shared, mildly correlated Σ, the empty prompt at
the mean of the class means) and ``anisotropic`` (four 3-D classes, Σ with a 4:1 spread of
variances and correlations). Each method's settings are tuned once on ``planar`` and used
unchanged on ``anisotropic`` and on every training seed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from components.analytic import (
    GaussianClassTeacher,
    class_conditioning,
    moments,
    null_conditioning,
)
from components.batches import PairBatches, PromptBatches
from components.config import from_dict
from components.generation import ddim_sample, generate_latents, seeded_noise
from components.methods import Teacher, get_method
from components.schedules import FlowSchedule
from components.training import LoopConfig, train


@dataclass(frozen=True)
class Problem:
    name: str
    means: torch.Tensor  # (K, d)
    cov: torch.Tensor  # (d, d)

    @property
    def K(self) -> int:
        return int(self.means.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def teacher(self, flow: bool = False) -> GaussianClassTeacher:
        """The exact teacher: ε on SD's VP table, or (``flow``) the flow velocity on the
        rectified-flow schedule with SD3's shift."""
        if flow:
            return GaussianClassTeacher(self.means, self.cov, FLOW_SCHEDULE,
                                        prediction_type="flow")
        return GaussianClassTeacher(self.means, self.cov)


FLOW_SCHEDULE = FlowSchedule(shift=3.0)


PROBLEMS = {
    "planar": Problem("planar", torch.tensor([[1.5, 0.0], [-0.75, 1.3], [-0.75, -1.3]]),
                      torch.tensor([[0.30, 0.08], [0.08, 0.20]])),
    "anisotropic": Problem("anisotropic",
                           torch.tensor([[1.4, 0.0, 0.3], [-0.7, 1.2, -0.2],
                                         [-0.7, -1.2, 0.4], [0.0, 0.2, -1.3]]),
                           torch.tensor([[0.40, 0.06, 0.00], [0.06, 0.10, 0.02],
                                         [0.00, 0.02, 0.25]])),
}
SEEDS = (0, 1, 2)
MEAN_TOL, COV_TOL = 0.15, 0.08
# Every untrained student starts displaced by this much in every mean coordinate (4 tolerances),
# so "the untrained student is far from the target" holds by construction.
DISPLACEMENT = 4 * MEAN_TOL

# (guidance scale of the target, method settings, iterations). Learning rates are the analytic
# problem's (the published ones are for SD); everything else is the published default.
CASES = {
    # SwiftBrush applies the same CFG to the teacher and to its LoRA teacher, whose unconditional
    # branch learns the student's own marginal: on this teacher (the empty prompt a Gaussian, not
    # the class mixture) its fixed point at s = 1 is the teacher's conditional distribution.
    # Where it goes at the published s = 4.5 is measured on the mixture teacher
    # (test_swiftbrush_guidance.py).
    # The student learns at a small fraction of its LoRA teacher's rate, as in the release
    # (1e-6 against 1e-3), so that the LoRA teacher keeps up with it. Measured on a 2-core Intel
    # Xeon, EMA student, max covariance error over classes: at 3e-4 against 1e-2 the raw
    # student's covariance kept swinging late in training (anisotropic, seed 0: 0.04 at 2,250
    # iterations, 0.09 at 3,000), so whether a run passed depended on where the CPU's rounding
    # left the swing; at 5e-5 every class of both problems and all three seeds ended within
    # 0.055. A slower LoRA teacher (3e-3) lags (0.12–0.28), a faster one (3e-2, the student
    # at 1e-4) is noisier (0.07–0.12, four runs).
    "swiftbrush": (1.0, {"student_lr": 5e-5, "lora_lr": 1e-2, "lora_rank": 8, "lora_alpha": 8,
                         "lora_targets": ["means", "cov", "hyper.0", "hyper.2", "head"],
                         "guidance_scale": 1.0}, 3000),
    # DMD2 publishes no EMA; its raw generator at the end of a 1,500-iteration stochastic run
    # still fluctuates (covariance 0.08–0.09 off on two of six runs), so the test reads an
    # average of the generator over its last ~20 updates (100 iterations), as every other
    # method's published EMA gives it.
    "dmd2": (2.0, {"generator_lr": 3e-4, "fake_lr": 3e-3, "gen_update_ratio": 5,
                   "warmup_steps": 0, "real_guidance_scale": 2.0,
                   "ema": {"kind": "constant", "decay": 0.95}}, 1500),
    "sid_lsg": (2.0, {"generator_lr": 3e-4, "fake_lr": 3e-3, "fake_train_guidance": 2.0,
                      "fake_eval_guidance": 2.0, "real_eval_guidance": 2.0}, 1500),
    "instaflow": (2.0, {"lr": 3e-3, "warmup_steps": 0, "distill_ode_steps": 16,
                        "distill_guidance": 1.0, "lpips_fraction": 0.0}, 1500),
    # Progressive distillation keeps the *N-step DDIM* distribution of its first teacher, whose
    # variance shrinks with few steps (on planar 4 steps give 0.10 for Σ₁₁ = 0.30, 64 give
    # 0.275): start from 64 steps (the default), halving six times to one.
    # Stage 1 at lr 1e-3 leaves the student's guidance 0.2 too high at w = 0 after 750
    # iterations (0.06 after 3,000); 3e-3 gets within 0.1 at every w in 900.
    "meng": (2.0, {"lr": 3e-3, "w_min": 0.0, "w_max": 2.0, "w_dim": 16,
                   "sample_guidance_weight": 1.0, "stage1_fraction": 0.3}, 3000),
}


class TeacherPairs:
    """The teacher's guided 50-step DDIM samples of 4,096 seeded noises (the pair cache), at one
    CFG scale or, with ``scale_range``, at a scale per pair drawn uniformly from it."""

    def __init__(self, problem: Problem, guidance_scale: float,
                 scale_range: tuple[float, float] | None = None, flow: bool = False):
        K, n = problem.K, 4096
        g = torch.Generator().manual_seed(1)
        self.dim = problem.dim
        self.prompt = torch.randint(0, K, (n,), generator=g)
        self.seed = torch.arange(n) + 10_000
        self.scale = None
        scale = guidance_scale
        if scale_range is not None:
            lo, hi = scale_range
            self.scale = lo + (hi - lo) * torch.rand(n, generator=g)
            scale = self.scale[:, None]
        with torch.no_grad():
            self.x1 = ddim_sample(problem.teacher(flow).network(), self.noise(torch.arange(n)),
                                  class_conditioning(self.prompt, K), null_conditioning(n, K),
                                  50, scale)

    def __len__(self) -> int:
        return int(self.prompt.shape[0])

    def noise(self, idx: torch.Tensor) -> torch.Tensor:
        return seeded_noise(self.seed[idx].tolist(), (self.dim,))

    def prompts(self, idx: torch.Tensor) -> torch.Tensor:
        return self.prompt[idx]

    def samples(self, idx: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.x1[idx].to(dtype)

    def guidance(self, idx: torch.Tensor) -> torch.Tensor | None:
        return None if self.scale is None else self.scale[idx]


@functools.cache
def teacher_pairs(problem_name: str, guidance_scale: float,
                  scale_range: tuple[float, float] | None = None,
                  flow: bool = False) -> TeacherPairs:
    return TeacherPairs(PROBLEMS[problem_name], guidance_scale, scale_range, flow)


def student_samples(net, spec, problem: Problem, c: int, n: int = 4000) -> torch.Tensor:
    z = torch.randn(n, problem.dim, generator=torch.Generator().manual_seed(5 + c))
    with torch.no_grad():
        return generate_latents(net, z, class_conditioning(torch.full((n,), c), problem.K), spec)


@torch.no_grad()
def displace(student: torch.nn.Module, problem: Problem) -> None:
    """Shift every class mean of a student copy by ``DISPLACEMENT`` in every coordinate."""
    student.means.weight[:, : problem.K] += DISPLACEMENT


def build(name: str, problem: Problem, steps: int, overrides: dict | None = None,
          flow: bool = False):
    _, settings, _ = CASES[name]
    cfg_cls, factory = get_method(name)
    cfg = from_dict(cfg_cls, {**settings, **(overrides or {})}, name)
    return factory(cfg, Teacher(problem.teacher(flow).network()), steps)


def batches_for(method, problem: Problem, guidance_scale: float, flow: bool = False):
    table = class_conditioning(torch.arange(problem.K), problem.K)
    null = null_conditioning(1, problem.K)
    if method.needs_pairs:
        # Meng et al. trains each sample at the w its pair was sampled with (a scale per pair)
        scale_range = getattr(method.cfg, "pair_guidance_range", lambda: None)()
        pairs = teacher_pairs(problem.name, guidance_scale, scale_range, flow)
        return PairBatches(table, null, pairs, (problem.dim,))
    return PromptBatches(table, null, (problem.dim,))


def run(method, batches, steps: int, seed: int, tmp_path: Path, on_sample=None):
    """Train through the real loop; leave the student holding its EMA (what a run saves)."""
    loop = LoopConfig(steps=steps, batch_size=256, seed=seed, log_every=steps,
                      sample_every=10**9 if on_sample is None else max(1, steps // 12),
                      checkpoint_every=10**9)
    torch.manual_seed(seed)
    ema = train(method, batches, loop, tmp_path, lambda m, k: None,
                on_sample or (lambda net, k: None))
    ema.copy_to(method.student())


def moment_errors(x, mean, cov) -> tuple[float, float]:
    m, C = moments(x)
    return float((m - mean).abs().max()), float((C - cov).abs().max())


def assert_close_moments(x, mean, cov, mean_tol, cov_tol, what):
    mean_err, cov_err = moment_errors(x, mean, cov)
    assert mean_err < mean_tol, f"{what}: mean {moments(x)[0]} vs {mean}"
    assert cov_err < cov_tol, f"{what}: covariance {moments(x)[1]} vs {cov}"


def assert_learned(untrained, x, mean, cov, tol: float, what: str) -> None:
    """The untrained student's samples miss the target (so passing means learning) and the
    trained student's samples ``x`` meet it, within ``tol`` times the tolerances."""
    mean_err, cov_err = moment_errors(untrained, mean, cov)
    assert mean_err > tol * MEAN_TOL or cov_err > tol * COV_TOL, (what, mean_err, cov_err)
    assert_close_moments(x, mean, cov, tol * MEAN_TOL, tol * COV_TOL, what)


def guidance_along_classes(x: torch.Tensor, teacher: GaussianClassTeacher, c: int) -> float:
    """The effective guidance scale of samples x of class c: where their mean sits on the line
    μ̄ + s (μ_c − μ̄) (1 at the conditional mean, s at the CFG target's)."""
    d = teacher.class_means[c] - teacher.null_mean
    return float((x.mean(0) - teacher.null_mean) @ d / (d @ d))
