"""kl_gap, gap_decomposition and gradient_snr against closed-form answers.

Stochastic assertions have false-alarm rate 1e-6 (z = 4.75 one-sided, 4.89 two-sided) with the
report's own standard errors."""

from __future__ import annotations

import math
from typing import Any

import matplotlib
import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_elbo
from pyro_elbo.diagnostics import effective_sample_size, psis_khat

from models import Z_ONE_SIDED, default_conjugate

matplotlib.use("Agg")


@pytest.mark.parametrize("scale_ratio", [0.8, 1.5], ids=["narrower", "wider"])
def test_bracket_contains_the_exact_kl(scale_ratio: float) -> None:
    c = default_conjugate()
    loc, scale = c.post_loc + 0.3 * c.post_scale, scale_ratio * c.post_scale
    report = pyro_elbo.kl_gap(c.model, c.guide_at(loc, scale), 1, num_particles=100_000, chunk_size=25_000)
    kl = c.kl(loc, scale)
    assert report.gap_lower.value - Z_ONE_SIDED * report.gap_lower.se <= kl
    assert kl <= report.gap_upper.value + Z_ONE_SIDED * report.gap_upper.se
    assert abs(report.elbo.value - c.elbo(loc, scale)) <= 4.89 * report.elbo.se
    assert report.resolvable and report.khat < 0.5
    assert set(report.iwae) == {1, 10, 100, 1000, 10_000, 100_000}
    text = str(report)
    assert "KL(q || p)  in [" in text and "PSIS k-hat" in text


def test_gap_is_zero_at_the_posterior(dtype: torch.dtype) -> None:
    c = default_conjugate()
    report = pyro_elbo.kl_gap(c.model, c.guide_at(c.post_loc, c.post_scale), 1, num_particles=1000)
    assert not report.resolvable
    assert abs(report.gap_lower.value) <= report.noise_floor
    assert abs(report.gap_upper.value) <= report.noise_floor
    assert "not resolvable" in str(report)


def two_site_model():
    """Two independent conjugate pieces: the guide is exact for z1 and far too narrow for z2."""
    c = default_conjugate()

    def model():
        z1 = pyro.sample("z1", dist.Normal(c.mu0, c.s0))
        z2 = pyro.sample("z2", dist.Normal(c.mu0, c.s0))
        with pyro.plate("obs", c.n):
            pyro.sample("x1", dist.Normal(z1, c.sigma), obs=c.x)
            pyro.sample("x2", dist.Normal(z2, c.sigma), obs=c.x)

    def guide(narrow: float = 0.2):
        pyro.sample("z1", dist.Normal(c.post_loc, c.post_scale))
        pyro.sample("z2", dist.Normal(c.post_loc, narrow * c.post_scale))

    return model, guide


def test_khat_flags_a_narrow_guide_and_names_the_site() -> None:
    model, guide = two_site_model()
    report = pyro_elbo.kl_gap(model, guide, num_particles=100_000, chunk_size=50_000)
    assert report.khat > 0.7
    assert report.khat_per_site["z2"] > 0.7
    assert report.khat_per_site["z1"] < 0.5
    assert any("k-hat" in w for w in report.warnings)
    good = pyro_elbo.kl_gap(model, lambda: guide(narrow=1.0), num_particles=20_000, chunk_size=20_000)
    assert good.khat < 0.5 and max(good.khat_per_site.values()) < 0.5


def test_khat_of_a_discrete_latent_with_few_weight_values() -> None:
    """Measured on examples/mixture_vimco.py: the 117 largest of 2000 log-weights took 2 values,
    and Pyro's Pareto fit divided by zero. A tail of repeated values is bounded: no tail."""
    log_w = torch.cat([torch.full((1883,), -2.0248), torch.full((1,), -1.9174), torch.full((116,), -1.8932)])
    assert psis_khat(log_w) == -math.inf
    assert psis_khat(torch.zeros(2000)) == -math.inf


def test_khat_known_answers() -> None:
    """Weights from a Student-t tail: k = 1/df (df=1 gives k~1, df=2 gives k~0.5)."""
    gen = torch.Generator().manual_seed(0)
    for df, expected in ((1.0, 1.0), (2.0, 0.5), (4.0, 0.25)):
        draws = torch.distributions.StudentT(df).sample((100_000,)).abs()
        k = psis_khat(draws.log())
        assert abs(k - expected) < 0.1, (df, k)
    assert effective_sample_size(torch.zeros(100)) == pytest.approx(100.0)
    assert gen is not None


class _QueuedNormal(dist.Normal):
    """A Normal whose reparameterized draws come from a fixed noise queue, so that two runs with
    different chunkings see exactly the same draws."""

    queue: list[torch.Tensor] = []

    def rsample(self, sample_shape=torch.Size()):  # noqa: B008
        shape = self._extended_shape(sample_shape)
        noise = _QueuedNormal.queue.pop(0).reshape(shape)
        return self.loc + self.scale * noise


def test_chunked_and_unchunked_agree_on_the_same_draws() -> None:
    c = default_conjugate()
    loc, scale = c.post_loc + 0.3, 1.3 * c.post_scale

    def guide(replicates):
        with pyro.plate("rep", replicates):
            pyro.sample("z", _QueuedNormal(torch.full((replicates,), loc), scale))

    def gap(chunk_size: int) -> Any:
        return pyro_elbo.kl_gap(
            c.model,
            guide,
            1,
            num_particles=4000,
            chunk_size=chunk_size,
            per_site=False,
            max_plate_nesting=2,
            vectorize_particles="plate",
        )

    noise = torch.randn(4000, 1)
    _QueuedNormal.queue = [noise]
    whole = gap(4000)
    _QueuedNormal.queue = list(noise.split(500))
    chunked = gap(500)
    for a, b in [(whole.elbo, chunked.elbo), (whole.cubo, chunked.cubo)] + [
        (whole.iwae[k], chunked.iwae[k]) for k in whole.iwae
    ]:
        assert a.value == pytest.approx(b.value, abs=1e-10) and a.se == pytest.approx(b.se, abs=1e-10)
    assert whole.khat == pytest.approx(chunked.khat, abs=1e-10)


def test_report_plot_has_the_ladder() -> None:
    c = default_conjugate()
    report = pyro_elbo.kl_gap(c.model, c.guide_at(c.post_loc + 0.2, 1.2 * c.post_scale), 1, num_particles=2000)
    fig = report.plot()
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "KL" in ax.get_title()
    matplotlib.pyplot.close(fig)


def test_gradient_snr_dreg_beats_iwae_at_large_k() -> None:
    c = default_conjugate()
    guide = c.guide_at(c.post_loc + 0.3 * c.post_scale, 1.2 * c.post_scale)
    n = 300
    snr = {
        name: pyro_elbo.gradient_snr(c.model, guide, 1, objective=cls(num_particles=64), num_samples=n)
        for name, cls in (("iwae", pyro_elbo.IWAE), ("dreg", pyro_elbo.DReG))
    }
    for param in ("loc", "scale"):
        s_i, s_d = float(snr["iwae"][param]), float(snr["dreg"][param])
        # SE of an SNR estimate from n draws: sqrt((1 + SNR^2 / 2) / n)
        se_i, se_d = math.sqrt((1 + s_i**2 / 2) / n), math.sqrt((1 + s_d**2 / 2) / n)
        assert s_d - s_i > Z_ONE_SIDED * math.hypot(se_i, se_d), (param, s_i, s_d)


def local_conjugate(offset: float):
    """Per-data-point conjugate model with a linear amortized encoder that is `offset` off."""
    prior_scale, noise = 1.0, 0.5
    post_var = 1 / (1 / prior_scale**2 + 1 / noise**2)
    data = torch.linspace(-2, 2, 6)

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, prior_scale))
            pyro.sample("x", dist.Normal(z, noise), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(post_var / noise**2 * x + offset, post_var**0.5))

    return model, guide, data


def test_gap_decomposition_adds_up_and_finds_only_amortization_error() -> None:
    model, guide, data = local_conjugate(offset=0.4)
    result = pyro_elbo.gap_decomposition(model, guide, data, num_particles=20_000, num_steps=400)
    assert result.approximation.value + result.amortization.value == pytest.approx(result.total.value, abs=1e-9)
    # the Gaussian family contains each local posterior: approximation gap ~ 0
    assert abs(result.approximation.value) <= 4.89 * result.approximation.se + 0.01
    exact_amortization = len(data) * 0.4**2 / (2 * 0.2)  # KL of a shifted Gaussian, per point
    assert result.amortization.value == pytest.approx(exact_amortization, abs=4.89 * result.amortization.se + 0.02)
    assert "amortization gap" in str(result)


def test_gap_decomposition_needs_local_latents() -> None:
    c = default_conjugate()

    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("obs", c.n):
            pyro.sample("x", dist.Normal(z, 1.0), obs=c.x)

    with pytest.raises(ValueError, match="amortized guide"):
        pyro_elbo.gap_decomposition(model, lambda: pyro.sample("z", dist.Normal(0.0, 1.0)))


def test_kl_gap_refuses_subsampled_plates() -> None:
    data = torch.linspace(-1, 1, 8)

    def model(x):
        with pyro.plate("data", len(x), subsample_size=3) as idx:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[idx])

    def guide(x):
        with pyro.plate("data", len(x), subsample_size=3):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"kl_gap needs the full data set, but plate\(s\) \['data'\]"):
        pyro_elbo.kl_gap(model, guide, data, num_particles=100)
