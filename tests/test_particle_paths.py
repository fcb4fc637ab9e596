"""Particles for models not written for a particle dim (issue 13.1): plate, vmap, sequential.

A Bayesian linear regression written as Pyro users write it (``x @ w`` with a vector latent
``w``) cannot take an outer particle plate. With the exact posterior as the guide every log-weight
equals log p(y) exactly, so each path must return log p(y) for every particle, to float rounding,
while the particles themselves differ.
"""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_elbo
from pyro_elbo._pyro.particles import ParticlePathWarning
from pyro_elbo.weights import log_weights

N, D, NOISE = 12, 3, 0.5


def _regression():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + NOISE * torch.randn(
        N, generator=gen, dtype=torch.float64
    )

    def model(x, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(D, dtype=x.dtype), 1.0).to_event(1))
        with pyro.plate("data", N):
            pyro.sample("y", dist.Normal(x @ w, NOISE), obs=y)

    precision = torch.eye(D, dtype=x.dtype) + x.T @ x / NOISE**2
    cov = torch.linalg.inv(precision)
    mean = cov @ x.T @ y / NOISE**2

    def guide(x, y):
        pyro.sample("w", dist.MultivariateNormal(mean, covariance_matrix=cov))

    marginal = dist.MultivariateNormal(torch.zeros(N, dtype=x.dtype), x @ x.T + NOISE**2 * torch.eye(N, dtype=x.dtype))
    return model, guide, x, y, float(marginal.log_prob(y))


@pytest.mark.parametrize("path", ["vmap", "sequential"])
def test_each_path_gives_the_exact_evidence_for_every_particle(path: str) -> None:
    model, guide, x, y, log_evidence = _regression()
    lw = log_weights(model, guide, x, y, num_particles=64, vectorize_particles=path)
    assert lw.log_w.shape == (64,)
    assert torch.allclose(lw.log_w, torch.full_like(lw.log_w, log_evidence), atol=1e-8)
    assert float(lw.log_q.std()) > 0.1  # distinct particles


def test_plate_path_refuses_a_model_it_cannot_run() -> None:
    model, guide, x, y, _ = _regression()
    with pytest.raises(ValueError, match="vectorize_particles='auto'"):
        log_weights(model, guide, x, y, num_particles=4, vectorize_particles="plate")


def test_auto_says_once_which_path_it_took_and_every_entry_point_works() -> None:
    model, guide, x, y, log_evidence = _regression()
    with pytest.warns(ParticlePathWarning, match="torch.func.vmap"):
        loss = pyro_elbo.IWAE(num_particles=8).loss(model, guide, x, y)
    assert loss == pytest.approx(-log_evidence, abs=1e-8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ParticlePathWarning)  # decided once: no second warning
        pyro_elbo.DReG(num_particles=8).loss(model, guide, x, y)
        draws_idata = pyro_elbo.to_inference_data(model, guide, x, y, num_samples=50)
    w = draws_idata.posterior["w"].values
    assert w.shape == (2, 25, D) and float(w.std()) > 0.01  # 50 draws as 2 chains of 25


def test_gradients_flow_through_vmap() -> None:
    """DReG's guide gradient is exactly zero at the exact posterior on every path (Tucker et al.);
    a trainable guide loc gets a finite, nonzero IWAE gradient away from it."""
    model, _, x, y, _ = _regression()
    pyro.clear_param_store()

    def guide(x, y):
        loc = pyro.param("loc", lambda: torch.zeros(D, dtype=x.dtype))
        pyro.sample("w", dist.Normal(loc, 0.3).to_event(1))

    loss = pyro_elbo.IWAE(num_particles=8, vectorize_particles="vmap").differentiable_loss(model, guide, x, y)
    (grad,) = torch.autograd.grad(loss, pyro.param("loc").unconstrained())
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0
    assert not math.isnan(float(loss.detach()))


@pytest.mark.parametrize("path", ["auto", "sequential"])
def test_kl_gap_on_a_model_without_particle_plate_measures_rounding_on_the_same_draws(path: str) -> None:
    """float32, a model that cannot take a particle plate, a guide 3 posterior sd off: the float64
    re-evaluation must replay the same draws (else the 'noise floor' is the spread of log w and
    the report says 'exact to rounding' for a guide many nats away: the worst lie a report can tell)."""
    model, _, x, y, _ = _regression()
    x, y = x.float(), y.float()
    precision = torch.eye(D, dtype=x.dtype) + x.T @ x / NOISE**2
    cov = torch.linalg.inv(precision)
    mean = cov @ x.T @ y / NOISE**2

    def far_guide(x, y):
        loc = (mean + 3 * cov.diagonal().sqrt()).to(x.dtype)  # runs in float64 too (the floor's replay)
        pyro.sample("w", dist.MultivariateNormal(loc, covariance_matrix=cov.to(x.dtype)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ParticlePathWarning)
        report = pyro_elbo.kl_gap(model, far_guide, x, y, num_particles=2000, per_site=False, vectorize_particles=path)
    assert report.noise_floor < 0.01, report.noise_floor
    assert "exact" not in report.verdict and report.resolvable
    lo, _ = report.kl_interval
    assert lo > 1.0  # exact KL = 3^2 * 3 / 2 = 13.5 nats


def _gp_with_a_sampled_lengthscale():
    import pyro.contrib.gp as gp
    from pyro.nn import PyroSample

    x = torch.linspace(-2.0, 2.0, 12, dtype=torch.float64)
    kernel = gp.kernels.Matern52(input_dim=1)
    kernel.lengthscale = PyroSample(dist.LogNormal(torch.tensor(0.0, dtype=torch.float64), 1.0))
    noise = torch.tensor(0.1, dtype=torch.float64)
    gpr = gp.models.GPRegression(x, torch.sin(2 * x), kernel, noise=noise, jitter=1e-3)
    gpr.kernel.autoguide("lengthscale", dist.Normal)
    return gpr


def test_a_mismatch_seen_only_with_batched_particles_is_no_model_guide_mismatch() -> None:
    """Pyro's GPRegression with a PyroSample hyperparameter is not written for batched latents; with
    the particles batched its sites look mismatched, but the one-particle program is valid: the
    plate says it cannot run the model (it names no mismatch), and ``auto`` takes another path."""
    pyro.clear_param_store()
    gpr = _gp_with_a_sampled_lengthscale()
    with pytest.raises(ValueError, match="not written for batched latents") as refused:
        log_weights(gpr.model, gpr.guide, num_particles=4, vectorize_particles="plate")
    assert not getattr(refused.value, "names_a_mismatch", False)
    with pytest.warns(ParticlePathWarning, match="cannot take a particle plate"):
        loss = pyro_elbo.IWAE(num_particles=4).loss(gpr.model, gpr.guide)
    assert math.isfinite(loss)
