"""AIS math on a pure-torch Gaussian target with a known normalizer (no Pyro).

Target per data point i: q = N(0, I_D), p(x_i, z) = exp(c_i) N(z; m_i, s^2 I_D), so p(x_i) = exp(c_i)
and the posterior is N(m_i, s^2 I). Statistical tolerances use the one-/two-sided normal quantiles
for a false-alarm rate of 1e-6 (tests/models.py) times a standard error measured in the test.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from pyro_elbo import ais
from tests.models import Z_ONE_SIDED, Z_TWO_SIDED


class GaussianTarget:
    """Chains on dim 0, data points on dim 1, latent event dim 2."""

    def __init__(self, m: Tensor, s: float, c: Tensor) -> None:
        self.m, self.s, self.c = m, s, c

    def log_densities(self, u: ais.Sites) -> tuple[Tensor, Tensor, Tensor]:
        z = u["z"]
        log_q = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_p = self.c + torch.distributions.Normal(self.m, self.s).log_prob(z).sum(-1)
        return log_p, log_q, torch.zeros_like(log_p)

    def reduce(self, tensor: Tensor, event_dim: int = 0) -> Tensor:
        return tensor.sum(tuple(range(-event_dim, 0))) if event_dim else tensor

    def broadcast(self, tensor: Tensor, like: Tensor) -> Tensor:
        return tensor.reshape(tensor.shape + (1,) * (like.dim() - tensor.dim()))

    def event_dim(self, value: Tensor) -> int:
        return value.dim() - 2


def make_target(num_points: int = 4, dim: int = 3, s: float = 0.5) -> GaussianTarget:
    g = torch.Generator().manual_seed(1)
    m = torch.randn(num_points, dim, generator=g).to(torch.get_default_dtype())
    c = torch.linspace(-3.0, 2.0, num_points)
    return GaussianTarget(m, s, c)


def test_sigmoid_schedule() -> None:
    betas = ais.sigmoid_schedule(50)
    assert betas.shape == (51,)
    assert betas[0] == 0 and betas[-1] == 1
    assert (betas.diff() > 0).all()
    with pytest.raises(ValueError, match="num_steps"):
        ais.sigmoid_schedule(0)


def test_hmc_leaves_the_posterior_invariant() -> None:
    # Chains started at exact posterior draws stay distributed as N(m, s^2) after 30 transitions.
    target = make_target()
    chains = 2000
    u = {"z": target.m + target.s * torch.randn(chains, *target.m.shape)}
    state = ais._evaluate(target, u)
    scale = {"z": torch.ones(1, 1, 1)}
    step = torch.full((1, 4), 0.3)
    for _ in range(30):
        state, prob = ais.hmc_step(target, state, 1.0, step, scale, num_leapfrog=3)
    z = state.u["z"]
    assert 0.3 < float(prob.mean()) < 1.0  # the moves do move
    # mean: se = s / sqrt(chains); variance of a normal sample: se = s^2 sqrt(2 / chains)
    assert (z.mean(0) - target.m).abs().max() < Z_TWO_SIDED * target.s / math.sqrt(chains)
    var_se = target.s**2 * math.sqrt(2 / chains)
    assert (z.var(0) - target.s**2).abs().max() < Z_TWO_SIDED * var_se


def test_forward_and_reverse_ais_bracket_the_normalizer() -> None:
    target = make_target()
    betas = ais.sigmoid_schedule(60)
    scale = {"z": torch.ones(1, 1, 1)}
    chains = 64
    u0 = {"z": torch.randn(chains, *target.m.shape)}
    tuned = ais.anneal(target, u0, betas, torch.full((4,), 0.5), scale, num_leapfrog=2, adapt=True)
    assert tuned.step_size.shape == (60, 4) and tuned.acceptance.shape == (60, 4)
    u0 = {"z": torch.randn(chains, *target.m.shape)}
    run = ais.anneal(target, u0, betas, tuned.step_size, scale, num_leapfrog=2)
    lower, lower_se = ais.logmeanexp(run.log_w), ais.log_mean_se(run.log_w)
    exact = {"z": target.m + target.s * torch.randn(chains, *target.m.shape)}
    steps = torch.cat([tuned.step_size.flip(0)[1:], tuned.step_size[:1]])
    back = ais.anneal(target, exact, betas.flip(0), steps, scale, num_leapfrog=2)
    upper, upper_se = -ais.logmeanexp(back.log_w), ais.log_mean_se(back.log_w)
    # Each bound is on its side of c up to Z * se (Jensen puts its bias on that side too).
    assert (lower - target.c < Z_ONE_SIDED * lower_se).all()
    assert (target.c - upper < Z_ONE_SIDED * upper_se).all()
    # And both are close: within 0.05 nats + Z * se (a 64-chain, 60-step AIS on a 3-d Gaussian).
    assert ((lower - target.c).abs() < 0.05 + Z_TWO_SIDED * lower_se).all()
    assert ((upper - target.c).abs() < 0.05 + Z_TWO_SIDED * upper_se).all()


def test_log_mean_se() -> None:
    assert float(ais.log_mean_se(torch.zeros(10, 3)).abs().max()) < 1e-3  # sqrt of rounding error
    log_w = torch.randn(100_000, 1)  # lognormal weights: var(w)/mean(w)^2 = e - 1
    se = float(ais.log_mean_se(log_w))
    assert abs(se - math.sqrt((math.e - 1) / 100_000)) < 0.05 * se
    assert torch.isnan(ais.log_mean_se(torch.zeros(1, 2))).all()


def test_mcmc_spreads_chains_from_one_exact_draw() -> None:
    # 2000 chains all start at one draw from N(m, s^2); after 20 HMC moves at beta = 1 they are
    # distributed as N(m, s^2) again (mean: se = s / sqrt(chains); variance: se = s^2 sqrt(2 / chains)).
    target = make_target()
    chains = 2000
    start = target.m + target.s * torch.randn(*target.m.shape)
    u0 = {"z": start.expand(chains, *target.m.shape).clone()}
    u, accept = ais.mcmc(
        target, u0, 1.0, torch.full((4,), 0.3), {"z": torch.ones(1, 1, 1)}, num_leapfrog=3, num_transitions=20
    )
    z = u["z"]
    assert accept.shape == (4,) and 0.3 < float(accept.mean()) <= 1.0
    assert (z.mean(0) - target.m).abs().max() < Z_TWO_SIDED * target.s / math.sqrt(chains)
    assert (z.var(0) - target.s**2).abs().max() < Z_TWO_SIDED * target.s**2 * math.sqrt(2 / chains)


def test_effective_chains() -> None:
    assert torch.allclose(ais.effective_chains(torch.zeros(16, 3)), torch.full((3,), 16.0))
    log_w = torch.tensor([[0.0], [-1000.0], [-1000.0]])
    assert torch.allclose(ais.effective_chains(log_w), torch.ones(1))
