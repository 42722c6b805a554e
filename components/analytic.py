"""An analytic teacher: class-conditional Gaussians whose noised ε is exact in closed form.

Data: ``x_0 | c ~ N(μ_c, Σ)`` for classes ``c = 0 … K−1`` (the "prompts"), and the empty prompt
``x_0 | ∅ ~ N(μ̄, Σ)``. Noised, ``x_t | c ~ N(α_t μ_c, A_t)`` with ``A_t = α_t² Σ + σ_t² I``, so

    ε(x_t, t, c) = σ_t A_t⁻¹ (x_t − α_t μ_c)                     (exact posterior mean of ε)

and because every prompt shares Σ, the CFG-guided ε with scale s is *also* the exact ε of a
Gaussian family, ``N(μ̄ + s (μ_c − μ̄), Σ)``, at every t. Every method therefore has one exact
target distribution per class, which the method tests compare against (means and covariances).
The empty prompt is a Gaussian there on purpose: with the mixture, the guided ε is not the ε of
any distribution and the "guided target" would not be defined.

The *mixture* teacher (``GaussianMixtureTeacher``) is the consistent one, as a real text-to-image
model is: the empty prompt is the marginal of the classes, ``x_0 | ∅ ~ (1/K) Σ_k N(μ_k, Σ)``, whose
noised ε is also closed form, ``σ_t A_t⁻¹ (x_t − α_t Σ_k r_k(x_t) μ_k)`` with the posterior class
responsibilities ``r_k ∝ N(x_t; α_t μ_k, A_t)``. It is where VSD's fixed point under CFG is
measured (SwiftBrush), since there an unconditional branch that learns a student's marginal is
compared with the teacher's true marginal.

Conditioning is a ``TextConditioning`` whose ``text`` is a (B, 1, K + 1) one-hot over the classes
and the empty prompt (last column), so methods handle it exactly like prompt embeddings.

``LinearFieldNet`` is the trainable network family: the teacher's closed form with learnable
means and covariance factor, plus a zero-initialised hyper-network ``M(t, c, w) x + b(t, c, w)``.
At initialisation it *is* the teacher; it can represent the exact ε, x0 or velocity field of any
Gaussian problem (affine in x), and it has ``nn.Linear`` layers that peft can put LoRA on.
"""

from __future__ import annotations

import torch
from torch import nn

from components.diffusion import NoiseSchedule, PredictionType, sinusoidal_embedding
from components.schedules import FlowSchedule
from components.teacher import TextConditioning


def class_conditioning(labels: torch.Tensor, num_classes: int) -> TextConditioning:
    """One-hot conditioning (B, 1, K + 1) for class ``labels`` (B,); label K is the empty prompt."""
    onehot = torch.nn.functional.one_hot(labels.long(), num_classes + 1).float()
    return TextConditioning(onehot[:, None, :])


def null_conditioning(batch: int, num_classes: int) -> TextConditioning:
    return class_conditioning(torch.full((batch,), num_classes), num_classes)


class LinearFieldNet(nn.Module):
    """``out = σ_t A_t⁻¹ (x − α_t μ(c)) + M(t, c, w) x + b(t, c, w)`` (see the module docstring).

    ``means`` maps the (K + 1)-dim conditioning to μ(c); ``cov`` holds a factor L with Σ = L Lᵀ;
    ``hyper`` is an MLP of (t, c, w) whose last layer ``head`` starts at zero. ``w`` (the guidance
    weight of a w-conditioned student) comes in as ``timestep_cond`` (B, w_dim), like diffusers'
    ``time_cond_proj_dim`` path.
    """

    def __init__(self, schedule: NoiseSchedule | FlowSchedule, means: torch.Tensor,
                 cov: torch.Tensor, prediction_type: PredictionType = "epsilon", hidden: int = 64,
                 t_features: int = 16, w_dim: int = 0, null_is_mixture: bool = False):
        super().__init__()
        dim = means.shape[1]
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.dim, self.t_features, self.w_dim = dim, t_features, w_dim
        self.null_is_mixture = null_is_mixture  # the empty prompt: the mixture of the classes
        self.means = nn.Linear(means.shape[0], dim, bias=False)
        self.cov = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            self.means.weight.copy_(means.T)
            self.cov.weight.copy_(torch.linalg.cholesky(cov))
        self.hyper = nn.Sequential(nn.Linear(t_features + means.shape[0] + w_dim, hidden),
                                   nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.head = nn.Linear(hidden, dim * dim + dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def with_w_embedding(self, w_dim: int) -> LinearFieldNet:
        """A copy that also reads a guidance-weight embedding (B, w_dim) as ``timestep_cond``;
        the new input columns start at zero, so the copy computes exactly what this one does."""
        table = self.means.weight.detach().T
        cov = self.cov.weight.detach() @ self.cov.weight.detach().T
        net = LinearFieldNet(self.schedule, table, cov, self.prediction_type,
                             self.hyper[0].out_features, self.t_features, w_dim,
                             self.null_is_mixture)
        state = {k: v for k, v in self.state_dict().items() if k != "hyper.0.weight"}
        net.load_state_dict(state, strict=False)
        with torch.no_grad():
            old = self.hyper[0].weight
            net.hyper[0].weight.zero_()
            net.hyper[0].weight[:, : old.shape[1]] = old
        return net

    def closed_form(self, x_t: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The Gaussian part (B, d) in this network's prediction type: ``ε̂ = σ_t A_t⁻¹ (x − α_t
        μ(c))``, ``x̂0 = μ(c) + α_t Σ A_t⁻¹ (x − α_t μ(c))`` (posterior means), the flow velocity
        ``ε̂ − x̂0`` or ``v = α_t ε̂ − σ_t x̂0``; with ``null_is_mixture`` the empty prompt's μ is
        the posterior mean of the class means, Σ_k r_k(x_t) μ_k (the same forms hold, Σ being
        shared)."""
        alpha, sigma = self.schedule.alpha_sigma(t, x_t)  # (B, 1)
        L = self.cov.weight
        Sigma = L @ L.T
        eye = torch.eye(self.dim, device=x_t.device, dtype=x_t.dtype)
        A = alpha[:, :, None] ** 2 * Sigma + sigma[:, :, None] ** 2 * eye  # (B, d, d)
        mu = self.means(c)
        if self.null_is_mixture:
            mu = torch.where(c[:, -1:] > 0.5, self._mixture_mean(x_t, alpha, A), mu)
        r = (x_t - alpha * mu)[..., None]
        if self.prediction_type == "epsilon":
            return sigma * torch.linalg.solve(A, r)[..., 0]
        solved = torch.linalg.solve(A, r)  # (B, d, 1)
        eps = sigma * solved[..., 0]
        x0 = mu + alpha * (Sigma @ solved)[..., 0]
        return {"sample": x0, "flow": eps - x0, "v_prediction": alpha * eps - sigma * x0}[
            self.prediction_type]

    def _mixture_mean(self, x_t: torch.Tensor, alpha: torch.Tensor, A: torch.Tensor):
        """Σ_k r_k μ_k (B, d), r_k ∝ N(x_t; α μ_k, A) over the K classes (the table's rows but
        the last, which is the empty prompt's)."""
        mu_k = self.means.weight.T[:-1]  # (K, d)
        diff = x_t[:, None, :] - alpha[:, :, None] * mu_k[None]  # (B, K, d)
        A_inv = torch.linalg.inv(A)  # (B, d, d), shared by the classes
        logits = -0.5 * torch.einsum("bkd,bde,bke->bk", diff, A_inv, diff)
        return torch.softmax(logits, dim=1) @ mu_k

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: TextConditioning,
                timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        c = cond.text[:, 0, :].to(x_t.dtype)
        t = t.to(x_t.device).float().expand(x_t.shape[0])
        parts = [sinusoidal_embedding(t, self.t_features, 1000.0), c]
        if self.w_dim:
            w = timestep_cond if timestep_cond is not None else torch.zeros(
                x_t.shape[0], self.w_dim, device=x_t.device)
            parts.append(w.to(x_t.dtype))
        h = self.head(self.hyper(torch.cat(parts, dim=1)))
        M = h[:, : self.dim * self.dim].view(-1, self.dim, self.dim)
        b = h[:, self.dim * self.dim:]
        # the discrete VP table reads rounded timesteps; a flow schedule reads t as it is
        return self.closed_form(x_t, self.schedule.snap(t), c) + (M @ x_t[..., None])[..., 0] + b


class GaussianClassTeacher:
    """The exact teacher and its exact targets; ``network()`` gives it as a frozen module."""

    null_is_mixture = False

    def __init__(self, means: torch.Tensor, cov: torch.Tensor,
                 schedule: NoiseSchedule | FlowSchedule | None = None,
                 null_mean: torch.Tensor | None = None,
                 prediction_type: PredictionType = "epsilon"):
        self.prediction_type = prediction_type  # "flow" on a FlowSchedule: a flow teacher
        self.class_means = means.float()  # (K, d)
        self.cov = cov.float()  # (d, d)
        self.null_mean = (self.class_means.mean(0) if null_mean is None else null_mean).float()
        self.schedule = schedule or NoiseSchedule.scaled_linear()

    @property
    def num_classes(self) -> int:
        return int(self.class_means.shape[0])

    @property
    def dim(self) -> int:
        return int(self.class_means.shape[1])

    def network(self, w_dim: int = 0) -> LinearFieldNet:
        """The teacher as a frozen ``LinearFieldNet`` (exact ε at initialisation)."""
        table = torch.cat([self.class_means, self.null_mean[None]])
        net = LinearFieldNet(self.schedule, table, self.cov, self.prediction_type, w_dim=w_dim,
                             null_is_mixture=self.null_is_mixture)
        return net.eval().requires_grad_(False)

    def guided_mean(self, c: int, guidance_scale: float) -> torch.Tensor:
        """Mean of the exact CFG target of class ``c``: ``μ̄ + s (μ_c − μ̄)``."""
        return self.null_mean + guidance_scale * (self.class_means[c] - self.null_mean)

    def sample(self, labels: torch.Tensor, guidance_scale: float,
               generator: torch.Generator) -> torch.Tensor:
        """Exact samples (B, d) of the guided target for class ``labels`` (B,)."""
        mean = torch.stack([self.guided_mean(int(c), guidance_scale) for c in labels])
        z = torch.randn(len(labels), self.dim, generator=generator)
        return mean + z @ torch.linalg.cholesky(self.cov).T


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample mean (d,) and covariance (d, d) of rows of ``x`` (N, d)."""
    mean = x.mean(0)
    centred = x - mean
    return mean, centred.T @ centred / (x.shape[0] - 1)


class GaussianMixtureTeacher(GaussianClassTeacher):
    """The classes of ``GaussianClassTeacher`` with the empty prompt as their equal-weight mixture
    (its ε exact too; see the module docstring). The CFG target is then no distribution, so
    ``guided_mean`` is only the mean of the guided *means* a student could be compared with."""

    null_is_mixture = True

    def sample_unconditional(self, n: int, generator: torch.Generator) -> torch.Tensor:
        labels = torch.randint(0, self.num_classes, (n,), generator=generator)
        return self.sample(labels, 1.0, generator)
