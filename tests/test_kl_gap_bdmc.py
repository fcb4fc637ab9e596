"""kl_gap(bdmc=...): the bracket on data simulated from the model, split by BDMC, against the
exact KL(q || p(z | x*)) and log p(x*) computed in closed form from the simulated x*.

Models: the exact families of tests/exact_models.py (guides from exact to 20 sd away; their
guides are fit to the real data, so on x* they are off by whatever x* moved the posterior), and
a hierarchical Gaussian with a global latent, a plate of local latents and an amortized guide.

Tolerances: each assertion that the truth lies in an interval widens the interval's ends by
Z_ONE_SIDED = 4.753 standard errors (false-alarm rate 1e-6 per side), the standard errors being
the report's own (BDMC's delta-method se of each AIS total and the ELBO's particle se, added in
quadrature). The slow sweep measures the miss rate of the printed 2-se interval itself
(2026-11-27: 6 misses in 300 runs, 2.0%, nominal <= 4.6%; 400-700 s on a shared 2-core CPU).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
import pytest
import torch
from exact_models import (
    Case,
    _quadrature_kl,
    beta_binomial,
    dirichlet_multinomial,
    gamma_poisson,
    local_normal,
    normal_mean,
)
from pyro.infer.autoguide import AutoNormal
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import kl_divergence

import pyro_elbo
from pyro_elbo.kl_gap import SimulatedGap
from tests.models import (
    Z_ONE_SIDED,
    discrete_latent_guide,
    discrete_latent_model,
    unbatched_regression,
    unbatched_regression_guide,
)

FAST = dict(num_chains=16, num_steps=50, transition="mala")


# ------------------------------------------------------------------ exact truths on x*
def _posterior(family: str, obs: dict[str, Tensor]) -> tuple[torch.distributions.Distribution, float]:
    """p(z | x*) (float64) and log p(x*) of an exact_models family, from its simulated x*."""
    f64 = {k: v.double() for k, v in obs.items()}
    if family == "normal mean":
        x = f64["x"]
        log_p = dist.MultivariateNormal(torch.zeros(5, dtype=x.dtype), torch.eye(5, dtype=x.dtype) + 1).log_prob(x)
        return torch.distributions.Normal(x.sum() / 6, 6**-0.5), float(log_p)
    if family == "local normal (per point)":
        x = f64["x"]
        log_p = dist.Normal(0.0, 1.25**0.5).log_prob(x).sum()
        return torch.distributions.Normal(0.8 * x, 0.2**0.5), float(log_p)
    if family == "beta-binomial":
        k = f64["k"]
        log_p = (
            math.lgamma(201)
            - torch.lgamma(k + 1)
            - torch.lgamma(201 - k)
            + torch.lgamma(1 + k)
            + torch.lgamma(201 - k)
            - math.lgamma(202)
        )
        return torch.distributions.Beta(1 + k, 201 - k), float(log_p)
    if family == "gamma-poisson":
        x = f64["x"]
        a, b = 2.0 + x.sum(), 0.5 + 30
        log_p = -torch.lgamma(x + 1).sum() + 2.0 * math.log(0.5) - math.lgamma(2.0) + torch.lgamma(a) - a * math.log(b)
        return torch.distributions.Gamma(a, torch.tensor(b, dtype=x.dtype)), float(log_p)
    if family == "dirichlet-multinomial":
        c = f64["c"]

        def lbeta(v: Tensor) -> Tensor:
            return torch.lgamma(v).sum() - torch.lgamma(v.sum())

        log_p = torch.lgamma(c.sum() + 1) - torch.lgamma(c + 1).sum() + lbeta(1 + c) - lbeta(torch.ones_like(c))
        return torch.distributions.Dirichlet(1 + c), float(log_p)
    raise KeyError(family)


def _guide_fn(guide: Callable[[], Any], name: str) -> Any:
    return pyro.poutine.trace(guide).get_trace().nodes[name]["fn"]


def _as64(fn: Any) -> torch.distributions.Distribution:
    if isinstance(fn, torch.distributions.Normal):
        return torch.distributions.Normal(fn.loc.double(), fn.scale.double())
    if isinstance(fn, torch.distributions.Beta):
        return torch.distributions.Beta(fn.concentration1.double(), fn.concentration0.double())
    if isinstance(fn, torch.distributions.Gamma):
        return torch.distributions.Gamma(fn.concentration.double(), fn.rate.double())
    if isinstance(fn, torch.distributions.Dirichlet):
        return torch.distributions.Dirichlet(fn.concentration.double())
    raise TypeError(type(fn))


def true_kl(case: Case, obs: dict[str, Tensor]) -> tuple[float, float]:
    """The exact KL(q || p(z | x*)) of the case's guide, and log p(x*)."""
    post, log_p = _posterior(case.family, obs)
    if isinstance(case.guide, AutoNormal):
        name = next(iter(case.guide.prototype_trace.iter_stochastic_nodes()))[0]
        loc, scale = float(getattr(case.guide.locs, name).detach()), float(getattr(case.guide.scales, name).detach())
        support = case.guide.prototype_trace.nodes[name]["fn"].support
        transform = torch.distributions.biject_to(support)

        def log_post_u(u: Any) -> Any:
            ut = torch.as_tensor(u, dtype=torch.float64)
            z = transform(ut)
            return (post.log_prob(z) + transform.log_abs_det_jacobian(ut, z)).numpy()

        return _quadrature_kl(loc, scale, log_post_u), log_p
    name = next(
        n
        for n, s in pyro.poutine.trace(case.guide).get_trace().nodes.items()
        if s["type"] == "sample" and not site_is_subsample(s)
    )
    return float(kl_divergence(_as64(_guide_fn(case.guide, name)), post).sum()), log_p


def _widened(sim: SimulatedGap, z: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """The KL interval and the sandwich, each end widened by z standard errors."""
    s, e = sim.sandwich, sim.report.elbo
    lo, hi = s.lower - e, s.upper - e
    floor = sim.report.noise_floor
    kl = (lo.value - z * lo.se - floor, hi.value + z * hi.se + floor)
    return kl, (s.lower.value - z * s.lower.se - floor, s.upper.value + z * s.upper.se + floor)


# ------------------------------------------------------------------ hierarchical Gaussian
N_HIER = 8


def hier_model(x: Tensor) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("x", dist.Normal(z, 0.5), obs=x)


#: the exact posterior: mu | x ~ N(a xbar, s_mu), z_i | mu, x ~ N(0.8 x_i + 0.2 mu, sqrt(0.2))
HIER_EXACT = (N_HIER / 1.25 / (1 + N_HIER / 1.25), 0.8, 0.2, (1 + N_HIER / 1.25) ** -0.5, 0.2**0.5)
HIER_GUIDES = {"exact": HIER_EXACT, "off": (0.7, 0.6, 0.2, 0.5, 0.6), "far": (3.0, 0.8, 0.2, 0.05, 0.1)}


def hier_guide(params: tuple[float, ...]) -> Callable[[Tensor], None]:
    a, b, c, s_mu, s_z = params

    def guide(x: Tensor) -> None:
        mu = pyro.sample("mu", dist.Normal(a * x.mean(), s_mu))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(b * x + c * mu, s_z))

    return guide


def hier_truth(params: tuple[float, ...], x: Tensor) -> tuple[float, float]:
    """KL(q || p(mu, z | x)) between joint Gaussians over (mu, z_1..N), and log p(x)."""
    a, b, c, s_mu, s_z = params
    x = x.double()
    n = len(x)
    one = torch.ones(n, dtype=x.dtype)
    q_mean = torch.cat([(a * x.mean()).reshape(1), b * x + c * a * x.mean()])
    q_cov = torch.zeros(n + 1, n + 1, dtype=x.dtype)
    q_cov[0, 0] = s_mu**2
    q_cov[0, 1:] = q_cov[1:, 0] = c * s_mu**2
    q_cov[1:, 1:] = c**2 * s_mu**2 + s_z**2 * torch.eye(n, dtype=x.dtype)
    prec = torch.zeros(n + 1, n + 1, dtype=x.dtype)
    prec[0, 0] = 1 + n
    prec[0, 1:] = prec[1:, 0] = -1.0
    prec[1:, 1:] = 5 * torch.eye(n, dtype=x.dtype)  # prior 1 + likelihood 1 / 0.25
    post_cov = torch.linalg.inv(prec)
    post_mean = post_cov @ torch.cat([torch.zeros(1, dtype=x.dtype), 4 * x])
    kl = kl_divergence(
        torch.distributions.MultivariateNormal(q_mean, q_cov),
        torch.distributions.MultivariateNormal(post_mean, post_cov),
    )
    marginal = torch.outer(one, one) + 1.25 * torch.eye(n, dtype=x.dtype)
    log_p = torch.distributions.MultivariateNormal(torch.zeros(n, dtype=x.dtype), marginal).log_prob(x)
    return float(kl), float(log_p)


def hier_data() -> Tensor:
    g = torch.Generator().manual_seed(2)
    mu = torch.randn((), generator=g)
    return mu + torch.randn(N_HIER, generator=g) * 1.25**0.5


# ------------------------------------------------------------------ fast tests
@pytest.mark.parametrize(
    "make, guide", [(normal_mean, "wide"), (beta_binomial, "AutoNormal"), (local_normal, "shifted 20 sd")]
)
def test_simulated_kl_interval_contains_the_exact_kl(make: Callable[[str], Case], guide: str) -> None:
    case = make(guide)
    pyro.set_rng_seed(0)
    report = pyro_elbo.kl_gap(case.model, case.guide, num_particles=2000, per_site=False, bdmc=FAST)
    sim = report.simulated
    assert sim is not None and not sim.guide_sees_data  # these guides are fit to the real data
    kl, log_p = true_kl(case, sim.sandwich.observed)
    (kl_lo, kl_hi), (lp_lo, lp_hi) = _widened(sim, Z_ONE_SIDED)
    assert lp_lo <= log_p <= lp_hi, (lp_lo, log_p, lp_hi)
    assert kl_lo <= kl <= kl_hi, (kl_lo, kl, kl_hi)
    # the split is arithmetic on the same numbers: width = shortfall + excess, upper end = KL + excess
    r, s = sim.report, sim.sandwich
    top = r.iwae[max(r.iwae)].value
    shortfall, excess = s.lower.value - top, r.cubo.value - s.lower.value
    assert shortfall + excess == pytest.approx(r.gap_upper.value - r.gap_lower.value, abs=1e-9)
    text = str(report)
    assert "simulated from the model" in text and "insofar as the model fits" in text
    assert "fit to the real data" in text  # the caveat for a guide that does not read x
    assert ("few chains carry" in text) == (sim.effective_chains < 0.25 * 16)


@pytest.mark.parametrize("guide", ["exact", "far"])
def test_amortized_guide_on_a_global_latent_and_a_plate(guide: str) -> None:
    params = HIER_GUIDES[guide]
    x = hier_data()
    pyro.set_rng_seed(1)
    report = pyro_elbo.kl_gap(hier_model, hier_guide(params), x, num_particles=1000, per_site=False, bdmc=FAST)
    sim = report.simulated
    assert sim is not None and sim.guide_sees_data
    x_star = sim.sandwich.observed["x"]
    assert x_star.shape == x.shape and not torch.equal(x_star, x)
    kl, log_p = hier_truth(params, x_star)
    if guide == "exact":
        assert kl < 1e-4
    (kl_lo, kl_hi), (lp_lo, lp_hi) = _widened(sim, Z_ONE_SIDED)
    assert lp_lo <= log_p <= lp_hi, (lp_lo, log_p, lp_hi)
    assert kl_lo <= kl <= kl_hi, (kl_lo, kl, kl_hi)
    assert "fit to the real data" not in str(report)


def test_bdmc_refusals_name_the_site() -> None:
    y = torch.zeros(4)
    with pytest.raises(ValueError, match=r"kl_gap\(bdmc=...\) cannot run BDMC: latent site 'c' is discrete"):
        pyro_elbo.kl_gap(discrete_latent_model, discrete_latent_guide, y, num_particles=10, bdmc=True)

    def subsampled(x: Tensor) -> None:
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0], subsample_size=2) as idx:
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x[idx])

    def mu_guide(x: Tensor) -> None:
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"plate 'data' is subsampled"):
        pyro_elbo.kl_gap(subsampled, mu_guide, y, num_particles=10, bdmc=True)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['chains'\]"):
        pyro_elbo.kl_gap(hier_model, hier_guide(HIER_EXACT), y, num_particles=10, bdmc={"chains": 3})

    def map_model() -> None:
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(mu, 1.0), obs=torch.tensor(0.3))

    with pytest.raises(ValueError, match=r"guide site 'mu' is a point mass"):
        pyro_elbo.kl_gap(map_model, pyro.infer.autoguide.AutoDelta(map_model), num_particles=10, bdmc=True)

    # checked before the long run: the model cannot broadcast over the chains
    x, obs = torch.randn(6, 3), torch.randn(6)
    with pytest.raises(
        ValueError, match=r"cannot run BDMC: AIS and BDMC run their 2 chains .* cannot broadcast over chains"
    ):
        pyro_elbo.kl_gap(unbatched_regression, unbatched_regression_guide, x, obs, num_particles=10, bdmc=True)


# ------------------------------------------------------------------ slow sweep
SWEEP_CASES: list[tuple[Callable[[str], Case], str]] = [
    (normal_mean, "exact"),
    (normal_mean, "narrow"),
    (normal_mean, "shifted 20 sd"),
    (beta_binomial, "exact"),
    (beta_binomial, "AutoNormal"),
    (beta_binomial, "off"),
    (gamma_poisson, "exact"),
    (gamma_poisson, "AutoNormal"),
    (gamma_poisson, "shifted 20 sd"),
    (dirichlet_multinomial, "off"),
    (local_normal, "exact"),
    (local_normal, "shifted 20 sd"),
]
SEEDS = 20


@pytest.mark.slow
def test_simulated_kl_interval_false_alarm_rate() -> None:
    # Each run prints KL in [L - E - 2 se - floor, U - E + 2 se + floor]: if the standard errors
    # were exact and the AIS bounds unbiased, each end would miss with probability 2.3%, so at most
    # 4.6% per run (less: the AIS biases push both ends outward). Over 12 cases x 20 seeds plus
    # the hierarchical model's 3 guides x 20 seeds = 300 runs, P(Binomial(300, 0.046) > 25) < 1e-2
    # (mean 13.8, sd 3.6): more than 25 misses means the se understate the error.
    misses, runs, worst = 0, 0, []
    start = time.perf_counter()
    for make, guide in SWEEP_CASES:
        case = make(guide)
        for seed in range(SEEDS):
            pyro.set_rng_seed(seed)
            report = pyro_elbo.kl_gap(case.model, case.guide, num_particles=2000, per_site=False, bdmc=FAST)
            assert report.simulated is not None
            kl, _ = true_kl(case, report.simulated.sandwich.observed)
            lo, hi = report.simulated.kl_interval
            miss = not lo <= kl <= hi
            misses, runs = misses + miss, runs + 1
            if miss:
                worst.append((case.family, guide, seed, round(lo, 3), round(kl, 3), round(hi, 3)))
    x = hier_data()
    for name, params in HIER_GUIDES.items():
        for seed in range(SEEDS):
            pyro.set_rng_seed(seed)
            report = pyro_elbo.kl_gap(hier_model, hier_guide(params), x, num_particles=2000, per_site=False, bdmc=FAST)
            assert report.simulated is not None
            kl, _ = hier_truth(params, report.simulated.sandwich.observed["x"])
            lo, hi = report.simulated.kl_interval
            miss = not lo <= kl <= hi
            misses, runs = misses + miss, runs + 1
            if miss:
                worst.append(("hierarchical", name, seed, round(lo, 3), round(kl, 3), round(hi, 3)))
    print(f"kl_gap(bdmc) KL-interval false-alarm rate: {misses}/{runs} in {time.perf_counter() - start:.0f} s")
    for row in worst:
        print("  miss:", row)
    assert misses <= 25
