"""Particles for models not written for a particle dim: plate, vmap, sequential.

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


def _beta_pair(num_data: int = 3):
    """A stick-breaking-like pair that cannot take a particle plate (``x @ v`` with a vector latent)."""
    x = torch.linspace(0.0, 1.0, num_data * 2).reshape(num_data, 2)

    def model():
        v = pyro.sample("v", dist.Beta(torch.full((2,), 2.0), torch.full((2,), 3.0)).to_event(1))
        with pyro.plate("data", num_data):
            pyro.sample("y", dist.Normal(x @ v, 1.0), obs=torch.zeros(num_data))

    def guide():
        a = pyro.param("a", lambda: torch.full((2,), 2.0), constraint=dist.constraints.positive)
        pyro.sample("v", dist.Beta(a, torch.full((2,), 3.0)).to_event(1))

    return model, guide


def test_beta_latents_take_the_vmap_path_with_unbiased_reparameterized_gradients() -> None:
    """Beta draws under vmap are normalized Gamma draws: the mean of 20,000 particles of
    Beta(2, 3) and the pathwise gradient of E[v] with respect to log a (exactly a b / (a + b)^2 =
    0.24; 200 particles) lie within 5 standard errors (false-alarm rate ~6e-7 each, normal approximation)."""
    model, guide = _beta_pair()
    with pytest.warns(ParticlePathWarning, match="torch.func.vmap"):
        log_weights(model, guide, num_particles=4)
    s = 20_000
    from pyro_elbo._pyro.particles import vmap_particles

    a = pyro.param("a").unconstrained()

    def one():
        return dist.Beta(pyro.param("a"), torch.full((2,), 3.0)).rsample()

    draws = vmap_particles(one, s)
    assert draws.shape == (s, 2) and bool(((draws > 0) & (draws < 1)).all())
    first = draws[:, 0].detach()
    mean, se = float(first.mean()), float(first.std()) / math.sqrt(s)
    assert abs(mean - 0.4) < 5 * se
    per_particle = torch.stack(
        [torch.autograd.grad(draws[i, 0], a, retain_graph=True)[0][0] for i in range(200)]
    )  # d v_i / d log a (the parameter is positive-constrained): chain rule a * dv/da
    exact = 2.0 * 3.0 / 25.0
    se = float(per_particle.std()) / math.sqrt(200)
    assert abs(float(per_particle.mean()) - exact) < 5 * se, (float(per_particle.mean()), exact, se)


@pytest.mark.parametrize("cell_type", [torch.nn.LSTMCell, torch.nn.GRUCell, torch.nn.RNNCell])
def test_recurrent_cells_run_under_vmap_with_the_cells_values(cell_type) -> None:
    """Inside vmap the fused cells are replaced by their gate equations: same values as the cell."""
    from pyro_elbo._pyro.particles import vmap_particles

    cell = cell_type(3, 4)
    x = torch.randn(5, 3)
    state = (torch.randn(5, 4), torch.randn(5, 4)) if cell_type is torch.nn.LSTMCell else torch.randn(5, 4)
    expected = cell(x, state)
    got = vmap_particles(lambda: cell(x, state), 2)
    for e, g in zip(
        expected if isinstance(expected, tuple) else (expected,), got if isinstance(got, tuple) else (got,)
    ):
        assert torch.allclose(g[0], e, atol=1e-6) and torch.allclose(g[1], e, atol=1e-6)
    assert torch._VF.lstm_cell is torch._C._VariableFunctions.lstm_cell  # put back


def test_an_lstm_cell_guide_takes_the_vmap_path() -> None:
    cell, head = torch.nn.LSTMCell(2, 4), torch.nn.Linear(4, 1)
    x = torch.linspace(-1.0, 1.0, 6)

    def model():
        with pyro.plate("data", 6):
            total = 0.0
            for t in range(2):
                total = total + pyro.sample(f"z_{t}", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(total, 1.0), obs=x)

    def guide():
        pyro.module("cell", cell)
        pyro.module("head", head)
        state, previous = (torch.zeros(6, 4), torch.zeros(6, 4)), torch.zeros(6)
        with pyro.plate("data", 6):
            for t in range(2):
                state = cell(torch.stack([x, previous], -1), state)
                previous = pyro.sample(f"z_{t}", dist.Normal(head(state[0]).squeeze(-1), 1.0))

    with pytest.warns(ParticlePathWarning, match="torch.func.vmap"):
        lw = log_weights(model, guide, num_particles=8)
    assert lw.log_w.shape == (8, 6) and bool(torch.isfinite(lw.log_w).all())
    assert lw.log_w.std(0).min() > 0  # particles differ


def test_gamma_draws_under_vmap_are_batched() -> None:
    """Gamma.rsample clamps in place, which vmap runs one particle at a time with a warning (an
    error here); the replacement draws the same distribution: the mean of 20,000 Gamma(2, 1.5)
    draws lies within 5 standard errors of 4/3 (false-alarm rate ~6e-7)."""
    from pyro_elbo._pyro.particles import vmap_particles

    draws = vmap_particles(lambda: dist.Gamma(torch.tensor(2.0), 1.5).rsample(), 20_000)
    se = float(draws.std()) / math.sqrt(draws.numel())
    assert abs(float(draws.mean()) - 4.0 / 3.0) < 5 * se


def test_batchnorm_in_training_mode_runs_under_vmap_as_one_particle_at_a_time() -> None:
    """Each particle is normalized by its own batch statistics and the running statistics move as
    they would with the particles run one after the other."""
    import copy

    from pyro_elbo._pyro.particles import vmap_particles

    norm = torch.nn.BatchNorm1d(3)
    sequential = copy.deepcopy(norm)

    def one():
        x = torch.randn(5, 3)
        return x, norm(x)

    xs, outs = vmap_particles(one, 4)
    for x, out in zip(xs, outs):
        assert torch.allclose(out, sequential(x), atol=1e-6)
    assert torch.allclose(norm.running_mean, sequential.running_mean, atol=1e-6)
    assert torch.allclose(norm.running_var, sequential.running_var, atol=1e-6)
    assert torch.nn.functional.batch_norm.__module__ == "torch.nn.functional"  # put back


def test_a_batchnorm_decoder_takes_the_vmap_path() -> None:
    decoder = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    x = torch.linspace(-1.0, 1.0, 10)

    def model():
        pyro.module("decoder", decoder)
        with pyro.plate("data", 10):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(decoder(z.unsqueeze(-1)).squeeze(-1), 1.0), obs=x)

    def guide():
        with pyro.plate("data", 10):
            pyro.sample("z", dist.Normal(pyro.param("m", lambda: torch.zeros(10)), 1.0))

    with pytest.warns(ParticlePathWarning, match="torch.func.vmap"):
        lw = log_weights(model, guide, num_particles=6)
    assert lw.log_w.shape == (6, 10) and bool(torch.isfinite(lw.log_w).all())


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
