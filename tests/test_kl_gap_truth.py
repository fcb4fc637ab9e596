"""kl_gap never reassures on a bad guide (issue 11), on models with exact log p(x) and KL
(tests/exact_models.py). Stochastic assertions: false-alarm rate 1e-6 per assertion, either from
the report's own standard errors (z = 4.75 one-sided) or, for verdicts, from the margins measured
over the seeds of the slow sweep in test_calibration.py (stated at each assertion)."""

from __future__ import annotations

import math
import time

import arviz as az
import pyro
import pyro.distributions as dist
import pytest
import torch
from exact_models import beta_binomial, gamma_poisson, linear_regression, normal_mean
from pyro.infer.autoguide import AutoDiagonalNormal, AutoMultivariateNormal, AutoNormal

import pyro_elbo
from pyro_elbo._pyro.inspect import float64_rounding_error, raise_if_nonfinite_observed
from pyro_elbo.diagnostics import psis_khat


def test_far_guide_is_bad_never_bounded() -> None:
    """Issue case: z ~ N(0, 1), q = N(100, 1), KL = 5000. Before: k-hat -inf "bounded", no warning."""
    report = pyro_elbo.kl_gap(
        lambda: pyro.sample("z", dist.Normal(0.0, 1.0)),
        lambda: pyro.sample("z", dist.Normal(100.0, 1.0)),
        num_particles=10_000,
    )
    assert report.khat > 0.7 and report.ess < 20 and not report.reliable
    assert report.verdict.startswith("BAD") and "unreliable" in report.warnings[0]
    lo, hi = report.kl_interval
    assert lo <= 5000 and hi == math.inf
    assert "no upper end" in str(report) and "bounded" not in str(report)


@pytest.mark.parametrize("make", [normal_mean, linear_regression, beta_binomial, gamma_poisson])
def test_guides_shifted_20_sd_are_bad(make) -> None:  # noqa: ANN001
    case = make("shifted 20 sd")
    report = pyro_elbo.kl_gap(case.model, case.guide, num_particles=4000, per_site=False)
    assert report.verdict.startswith("BAD") and report.kl_interval[0] <= case.kl
    assert report.log_evidence_interval[0] <= case.log_evidence


def test_psis_khat_matches_arviz_psislw() -> None:
    """ArviZ's psislw is the reference; the same Zhang-Stephens fit gives the same k (to 1e-6)."""
    torch.manual_seed(0)
    for log_w in (
        torch.randn(10_000) * 50,
        torch.randn(10_000) * 3,
        torch.distributions.StudentT(2.0).sample((5000,)).abs().log(),
    ):
        expected = float(az.psislw(log_w.double().numpy())[1])
        assert psis_khat(log_w) == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert psis_khat(torch.randn(10_000) * 50) > 10  # ArviZ: 15.0
    assert psis_khat(torch.zeros(1000)) == -math.inf


def _inf_model(x: torch.Tensor) -> None:
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def _inf_guide(x: torch.Tensor) -> None:
    loc = pyro.param("loc", torch.tensor(0.0))
    pyro.sample("z", dist.Normal(loc, 1.0))


def test_infinite_data_raises_naming_the_site() -> None:
    x = torch.tensor([0.5, math.inf, 1.0])
    with pytest.raises(ValueError, match=r"kl_gap: observed site 'x' has 1 non-finite value"):
        pyro_elbo.kl_gap(_inf_model, _inf_guide, x, num_particles=100)
    with pytest.raises(ValueError, match=r"gradient_snr: observed site 'x'"):
        pyro_elbo.gradient_snr(_inf_model, _inf_guide, x, num_samples=5)
    mask = torch.tensor([True, False, True])

    def masked(x: torch.Tensor) -> None:
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)), pyro.poutine.mask(mask=mask):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    raise_if_nonfinite_observed(masked, _inf_guide, (x,), {})  # the inf is masked out: no error


def _gamma_poisson_counts(dtype: torch.dtype):  # noqa: ANN202
    """Issue case: counts near 1000, N = 1000, the exact posterior as guide (KL = 0)."""
    torch.manual_seed(1)
    counts = dist.Poisson(torch.tensor(1000.0, dtype=dtype)).sample((1000,))
    a, b = 2.0 + float(counts.sum()), 0.002 + 1000

    def model() -> None:
        lam = pyro.sample("lam", dist.Gamma(torch.tensor(2.0, dtype=dtype), 0.002))
        with pyro.plate("d", 1000):
            pyro.sample("x", dist.Poisson(lam), obs=counts)

    return model, lambda: pyro.sample("lam", dist.Gamma(torch.tensor(a, dtype=dtype), b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noise_floor_bounds_the_rounding_error(dtype: torch.dtype) -> None:
    """Before: float32 said "KL in [0.128, 0.251]" for this exact guide. The floor is measured by
    re-evaluation in float64 and must exceed the real rounding range of every particle."""
    torch.set_default_dtype(dtype)
    model, guide = _gamma_poisson_counts(dtype)
    report = pyro_elbo.kl_gap(model, guide, num_particles=5000)
    assert not report.resolvable and report.verdict.startswith("exact to rounding")
    assert report.kl_interval[0] == 0.0
    if dtype == torch.float32:
        error = float64_rounding_error(model, guide, (), {}, 5000, 1)
        assert error is not None
        assert report.noise_floor >= float(error.max() - error.min())


def test_printed_interval_has_error_bars_and_its_meaning() -> None:
    case = normal_mean("wide")
    report = pyro_elbo.kl_gap(case.model, case.guide, num_particles=20_000)
    lo, hi = report.kl_interval
    low, high = report.gap_lower, report.gap_upper
    assert lo == pytest.approx(max(0.0, low.value - 2 * low.se - report.noise_floor))
    assert hi == pytest.approx(high.value + 2 * high.se + report.noise_floor)
    # the exact KL is inside the bounds widened by 4.75 se (false alarm 1e-6 per side)
    assert low.value - 4.75 * low.se <= case.kl <= high.value + 4.75 * high.se
    text = str(report)
    assert f"KL(q || p)  in [{lo:.4f}, {hi:.4f}]" in text and "2 standard errors" in text
    assert report.verdict.startswith("the bracket is reliable")  # KL 0.26: above the 0.1 nats of "good"


@pytest.mark.parametrize("make", [beta_binomial, gamma_poisson])
def test_near_exact_autonormal_on_a_constrained_latent_is_not_called_far(make) -> None:  # noqa: ANN001
    """KL ~ 3e-4 (quadrature): heavy tails (k-hat 0.6-6 in the slow sweep), never "far"/"BAD"."""
    case = make("AutoNormal")
    assert case.kl < 0.001
    report = pyro_elbo.kl_gap(case.model, case.guide, num_particles=10_000)
    assert "BAD" not in report.verdict and "far" not in report.verdict
    if not report.reliable:
        assert report.verdict.startswith("KL small") and "tails" in report.verdict
        assert "CUBO" in report.warnings[0]


def _gamma_model() -> None:
    p = pyro.sample("p", dist.Gamma(3.0, 1.0))
    pyro.sample("x", dist.Poisson(p), obs=torch.tensor(4.0))


@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal, None])
def test_one_site_model_per_site_khat_equals_overall(guide_cls) -> None:  # noqa: ANN001
    """Before: AutoNormal gave per-site -1.58 vs overall 1.07 (the *_unconstrained density was left out)."""
    guide = (lambda: pyro.sample("p", dist.LogNormal(1.2, 0.3))) if guide_cls is None else guide_cls(_gamma_model)
    report = pyro_elbo.kl_gap(_gamma_model, guide, num_particles=5000)
    assert set(report.khat_per_site) == {"p"}
    assert report.khat_per_site["p"] == pytest.approx(report.khat, abs=1e-6)


def test_joint_guide_has_no_per_site_split() -> None:
    def model() -> None:
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Normal(a, 1.0))
        pyro.sample("x", dist.Normal(a + pyro.sample("c", dist.Normal(0.0, 1.0)), 1.0), obs=torch.tensor(1.0))

    report = pyro_elbo.kl_gap(model, AutoMultivariateNormal(model), num_particles=1000)
    assert report.khat_per_site == {} and set(report.joint_sites) == {"a", "b", "c"}
    assert "joint guide density" in str(report)


def test_gap_decomposition_reports_not_converged() -> None:
    x = torch.linspace(-2, 2, 6)

    def model(x: torch.Tensor) -> None:
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def guide(x: torch.Tensor) -> None:
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(x + 5.0, 0.4))

    result = pyro_elbo.gap_decomposition(model, guide, x, num_particles=2000, num_steps=10, max_steps=10)
    assert not result.converged and result.num_steps == 10 and "not converged" in str(result)
    assert "approximation gap" not in str(result)


def test_huge_particle_count_fails_fast_naming_the_option() -> None:
    case = normal_mean("wide")
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"kl_gap\(num_particles=1000000000\).*max_seconds"):
        pyro_elbo.kl_gap(case.model, case.guide, num_particles=10**9)
    assert time.perf_counter() - start < 30


def _network_model(dtype_of_constant: torch.dtype | None) -> tuple:  # noqa: ANN001
    """A VAE-like pair in float32 (whatever the suite's default dtype) whose networks (pyro.module)
    hold float32 weights; optionally the model also
    uses a constant pinned to float32, which no upcast reaches."""
    torch.manual_seed(0)
    decoder = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5)).float()
    encoder = torch.nn.Linear(5, 4).float()
    pinned = torch.ones(5, 5, dtype=dtype_of_constant) if dtype_of_constant is not None else None

    def model(x: torch.Tensor) -> None:
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            loc = decoder(z) if pinned is None else decoder(z) @ pinned
            pyro.sample("x", dist.Normal(loc, 0.5).to_event(1), obs=x)

    def guide(x: torch.Tensor) -> None:
        pyro.module("encoder", encoder)
        loc, log_scale = encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    return model, guide, decoder


def test_noise_floor_is_measured_against_float64_for_float32_networks() -> None:
    """Module weights are upcast for the float64 re-evaluation and put back exactly after it."""
    pyro.clear_param_store()
    model, guide, decoder = _network_model(None)
    weight = decoder[0].weight
    before = weight.detach().clone()
    report = pyro_elbo.kl_gap(model, guide, torch.randn(20, 5, dtype=torch.float32), num_particles=200)
    assert report.floor_source == "measured against float64"
    assert decoder[0].weight is weight and weight.dtype == torch.float32 and torch.equal(weight, before)


def test_noise_floor_falls_back_to_magnitudes_when_float64_cannot_run() -> None:
    """A float32 constant the model multiplies by cannot be upcast: the floor is derived from the
    magnitudes of the site log-densities, 100 times the estimate, and says so."""
    pyro.clear_param_store()
    model, guide, _ = _network_model(torch.float32)
    report = pyro_elbo.kl_gap(model, guide, torch.randn(20, 5, dtype=torch.float32), num_particles=200)
    assert report.floor_source == "magnitudes (float64 re-evaluation failed)"
    eps = torch.finfo(torch.float32).eps
    assert report.noise_floor > 100 * 4 * eps  # at least 100 x (4 eps x mean |log-density| >= 1 nat here)
    assert math.isfinite(report.noise_floor)
