"""A guide whose support is wider than the model's: warned about once, trained as Pyro trains it,
its draws outside scored -inf, log p(x) still estimated, and the KL reported infinite.

Exact answers: a latent with no data has posterior = prior and log p(x) = 0, so an importance
estimate of log p(x) is checked against 0 within 5 of its standard errors (two-sided Gaussian
false-alarm rate 6e-7)."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_elbo
from pyro_elbo._kl_gap_text import CLAIMS
from pyro_elbo._pyro.supports import SupportWarning

PRIORS = {
    # prior, guide loc and scale, observed x ~ Normal(z, 0.1) or None, log p(x)
    "uniform": (lambda: dist.Uniform(0.0, 1.0), 0.5, 0.2, None, 0.0),  # P(outside) = 1.2%
    "halfnormal": (lambda: dist.HalfNormal(1.0), 0.8, 0.6, None, 0.0),  # P(outside) = 9.1%
    # q is the posterior Normal(0, 0.1) up to a truncation at 100 sd (P(outside) = 0): its draws alone
    # say "exact", the support says KL = inf
    "uniform-exact-draws": (lambda: dist.Uniform(-10.0, 10.0), 0.0, 0.1, 0.0, -math.log(20.0)),
}


def program(prior: str):
    prior_fn, loc, scale, observed, _ = PRIORS[prior]

    def model():
        z = pyro.sample("z", prior_fn())  # built at run time, in the test's default dtype
        if observed is not None:
            pyro.sample("x", dist.Normal(z, 0.1), obs=torch.tensor(observed))

    def guide():
        pyro.sample("z", dist.Normal(pyro.param("loc", torch.tensor(loc)), scale))

    return model, guide


@pytest.mark.parametrize("prior", PRIORS)
def test_kl_gap_says_the_kl_is_infinite_and_never_good_or_exact(prior: str) -> None:
    model, guide = program(prior)
    with pytest.warns(SupportWarning, match="Guide site 'z' has support reals in \\[-inf, inf\\], wider"):
        report = pyro_elbo.kl_gap(model, guide, num_particles=2000, per_site=False)
    assert report.verdict.startswith("infinite: KL(q || p) = inf by definition, because guide site 'z'")
    assert not report.verdict.startswith(CLAIMS)
    assert report.kl_interval == (math.inf, math.inf)
    assert "KL(q || p)  = inf by definition" in str(report)
    assert any("fell outside the model's support" in w for w in report.warnings)
    if prior == "uniform-exact-draws":
        assert report.outside_draws == 0 and report.ess >= 0.99 * report.num_particles  # exact, but for the support
    top, truth = report.iwae[max(report.iwae)], PRIORS[prior][-1]
    assert abs(top.value - truth) <= 5 * top.se + report.noise_floor  # IWAE stays valid


@pytest.mark.parametrize("prior", ["uniform", "halfnormal"])
def test_log_evidence_stays_valid_with_a_wider_guide(prior: str) -> None:
    model, guide = program(prior)
    with pytest.warns(SupportWarning, match="Importance-sampling estimates of log p\\(x\\).*stay valid"):
        estimate = pyro_elbo.log_evidence(model, guide, num_particles=2000)
    total = estimate.total
    assert abs(total.value) <= 5 * total.se


def test_the_restricted_bracket_measures_the_truncated_guide() -> None:
    """HalfNormal(1) prior, Normal(0.8, 0.6) guide: q restricted to z > 0 is a truncated normal whose
    KL to HalfNormal(1) is computed by quadrature; the restricted bracket is an estimate of
    [KL - IWAE looseness, KL + CUBO looseness], so it must straddle the truth up to 5 standard
    errors of the ELBO (the leading noise of both ends)."""
    model, guide = program("halfnormal")
    with pytest.warns(SupportWarning):
        report = pyro_elbo.kl_gap(model, guide, num_particles=4000, per_site=False)
    z = torch.linspace(1e-9, 12.0, 400_001, dtype=torch.float64)
    q = torch.distributions.Normal(torch.tensor(0.8, dtype=torch.float64), 0.6)
    log_q = q.log_prob(z) - torch.log(1 - q.cdf(torch.tensor(0.0, dtype=torch.float64)))
    log_p = torch.distributions.HalfNormal(torch.tensor(1.0, dtype=torch.float64)).log_prob(z)
    exact = float(torch.trapezoid(log_q.exp() * (log_q - log_p), z))
    assert report.restricted_kl is not None
    lower, upper = report.restricted_kl
    slack = 5 * report.iwae[max(report.iwae)].se + 5 * report.log_w_sd / math.sqrt(4000)
    assert lower - slack <= exact <= upper + slack


def test_a_model_that_cannot_run_on_a_draw_outside_names_the_site() -> None:
    """A Normal(-5, 0.1) guide for a scale: every draw is negative, and the model's Normal(0, scale)
    refuses it; the error names the guide site and its draw, not the particle plate."""
    data = torch.tensor([0.3, -0.2, 1.1])

    def model():
        scale = pyro.sample("scale", dist.HalfCauchy(1.0))
        with pyro.plate("data", len(data)):
            pyro.sample("x", dist.Normal(0.0, scale), obs=data)

    def guide():
        pyro.sample("scale", dist.Normal(pyro.param("loc", torch.tensor(-5.0)), 0.1))

    with pytest.warns(SupportWarning):  # once, on the first call
        for objective in (pyro_elbo.ELBO(), pyro_elbo.IWAE(num_particles=8)):
            with pytest.raises(
                ValueError, match=r"Guide site 'scale' drew -\d.* outside the model's support reals in \[0, inf\]"
            ):
                objective.loss(model, guide)


def test_a_per_point_report_of_a_wider_guide_is_infinite_at_every_level() -> None:
    data = torch.linspace(-1.0, 1.0, 12)

    def model():
        with pyro.plate("data", len(data)):
            s = pyro.sample("s", dist.HalfNormal(1.0))
            pyro.sample("x", dist.Normal(0.0, s.abs() + 0.5), obs=data)

    def guide():
        with pyro.plate("data", len(data)):
            pyro.sample("s", dist.Normal(pyro.param("loc", torch.full((len(data),), 0.8)), 0.5))

    with pytest.warns(SupportWarning):
        report = pyro_elbo.kl_gap(model, guide, num_particles=500, per_site=False)
    assert report.num_points == len(data) and report.verdict.startswith("infinite:")
    assert report.outside_draws > 0  # P(outside) = 5.5% per draw: 6000 draws all inside has probability < 1e-140
    text = str(report)
    assert "KL bracket  inf by definition" in text and f"of {500 * len(data)} draws" in text


def test_a_narrower_guide_is_never_exact_and_keeps_only_the_lower_ends() -> None:
    """Uniform(0, 5) guide for a Uniform(0, 10) latent without data: every weight is 1/2, so the
    draws alone say "exact", yet KL(q || p) = log 2: the draws cannot see the posterior's other half."""

    def model():
        pyro.sample("z", dist.Uniform(0.0, 10.0))

    def guide():
        pyro.sample("z", dist.Uniform(0.0, 5.0))

    report = pyro_elbo.kl_gap(model, guide, num_particles=500, per_site=False)
    assert report.verdict.startswith("unverifiable: KL(q || p) >= 0 nats, no upper end, because guide site 'z'")
    assert not report.verdict.startswith(CLAIMS)
    low, high = report.kl_interval
    assert high == math.inf and low <= math.log(2.0)
    assert report.log_evidence_interval[1] == math.inf
    assert "narrower than the model's reals in [0, 10]" in str(report)
