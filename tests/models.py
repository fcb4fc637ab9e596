"""Test models with closed-form answers.

``Conjugate``: z ~ N(mu0, s0^2), x_i | z ~ N(z, sigma^2), i = 1..n. The posterior, log p(x), the
ELBO and CUBO_2 of any Gaussian guide are closed form. The model is replicated ``R`` times in a
plate ``"rep"`` that encloses every site, so the objectives return ``R`` independent per-replicate
bounds, and a guide with per-replicate parameters gives ``R`` independent gradient draws in one
backward pass: Monte Carlo statistics are vectorized, not looped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

#: one-sided and two-sided normal quantiles for a false-alarm rate of 1e-6
Z_ONE_SIDED = 4.753
Z_TWO_SIDED = 4.892


@dataclass
class Conjugate:
    x: Tensor
    mu0: float = 0.0
    s0: float = 1.0
    sigma: float = 1.0

    @property
    def n(self) -> int:
        return self.x.shape[0]

    @property
    def post_scale(self) -> float:
        return (1.0 / self.s0**2 + self.n / self.sigma**2) ** -0.5

    @property
    def post_loc(self) -> float:
        return self.post_scale**2 * (self.mu0 / self.s0**2 + float(self.x.sum()) / self.sigma**2)

    @property
    def log_evidence(self) -> float:
        cov = self.sigma**2 * torch.eye(self.n) + self.s0**2 * torch.ones(self.n, self.n)
        mvn = dist.MultivariateNormal(torch.full((self.n,), self.mu0), cov)
        return float(mvn.log_prob(self.x))

    def kl(self, loc: float, scale: float) -> float:
        """KL(N(loc, scale^2) || posterior)."""
        m, s = self.post_loc, self.post_scale
        return math.log(s / scale) + (scale**2 + (loc - m) ** 2) / (2 * s**2) - 0.5

    def elbo(self, loc: float, scale: float) -> float:
        return self.log_evidence - self.kl(loc, scale)

    def cubo2(self, loc: float, scale: float) -> float:
        """Exact CUBO_2 = log p(x) + 0.5 log E_q[(post/q)^2] (infinite if scale^2 <= post_var / 2)."""
        m, v, s2 = self.post_loc, self.post_scale**2, scale**2
        a = 1 / v - 1 / (2 * s2)
        if a <= 0:
            return math.inf
        b = 2 * m / v - loc / s2
        c = -math.log(2 * math.pi * v) - m**2 / v + 0.5 * math.log(2 * math.pi * s2) + loc**2 / (2 * s2)
        log_ratio2 = 0.5 * math.log(math.pi / a) + b**2 / (4 * a) + c
        return self.log_evidence + 0.5 * log_ratio2

    def model(self, replicates: int = 1) -> None:
        with pyro.plate("rep", replicates, dim=-1):
            z = pyro.sample("z", dist.Normal(self.mu0, self.s0))
            with pyro.plate("obs", self.n, dim=-2):
                pyro.sample("x", dist.Normal(z, self.sigma), obs=self.x.unsqueeze(-1))

    def guide_at(self, loc: float, scale: float):  # noqa: ANN201
        """A guide with per-replicate parameters initialized at (loc, scale)."""

        def guide(replicates: int = 1) -> None:
            with pyro.plate("rep", replicates, dim=-1):
                q_loc = pyro.param("loc", lambda: torch.full((replicates,), float(loc)))
                q_scale = pyro.param(
                    "scale", lambda: torch.full((replicates,), float(scale)), constraint=dist.constraints.positive
                )
                pyro.sample("z", dist.Normal(q_loc, q_scale))

        return guide


def default_conjugate() -> Conjugate:
    return Conjugate(x=torch.tensor([0.5, 1.5, 1.0, -0.3, 0.8]))


def param_grad(name: str) -> Tensor:
    """Gradient with respect to the unconstrained parameter ``name`` of the param store."""
    grad = pyro.get_param_store()[name].unconstrained().grad
    assert grad is not None, name
    return grad.detach().clone()


def mean_se(x: Tensor) -> tuple[float, float]:
    x = x.double().flatten()
    return float(x.mean()), float(x.std() / math.sqrt(x.numel()))


def rounding_tolerance() -> float:
    """What rounding leaves of an exact zero in the default dtype (sums of O(10) terms)."""
    return 1e-12 if torch.get_default_dtype() == torch.float64 else 1e-5


def relative_tolerance() -> float:
    """Relative agreement expected between two float computations of the same quantity."""
    return 1e-9 if torch.get_default_dtype() == torch.float64 else 1e-4


def discrete_latent_model(x: Tensor) -> None:
    """A local Bernoulli latent: what AIS and BDMC refuse (their moves need continuous latents)."""
    with pyro.plate("data", x.shape[0]):
        c = pyro.sample("c", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Normal(c, 1.0), obs=x)


def discrete_latent_guide(x: Tensor) -> None:
    with pyro.plate("data", x.shape[0]):
        pyro.sample("c", dist.Bernoulli(0.5))


def unbatched_regression(x: Tensor, y: Tensor) -> None:
    """``x @ w`` with a vector latent ``w``: a model not written for batched latents."""
    w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[-1]), 1.0).to_event(1))
    pyro.sample("y", dist.Normal(x @ w, 1.0).to_event(1), obs=y)


def unbatched_regression_guide(x: Tensor, y: Tensor) -> None:
    pyro.sample("w", dist.Normal(torch.zeros(x.shape[-1]), 1.0).to_event(1))


def normal_mean_model(x: Tensor) -> None:
    """A normal mean with a standard normal prior: the smallest model a training step can take."""
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(loc, 1.0), obs=x)


def normal_mean_guide(x: Tensor) -> None:
    """A normal guide for :func:`normal_mean_model`'s mean (parameters ``m`` and ``s``)."""
    m = pyro.param("m", torch.tensor(0.0))
    s = pyro.param("s", torch.tensor(1.0), constraint=dist.constraints.positive)
    pyro.sample("loc", dist.Normal(m, s))
