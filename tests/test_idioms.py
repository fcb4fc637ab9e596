"""Pyro users' existing models and guides work unchanged: autoguides, pyro.module networks,
PyroModules with local parameters, subsampled plates, and models not written for batched
latents (``x @ w``)."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoDelta, AutoMultivariateNormal, AutoNormal

import pyro_elbo
from pyro_elbo._pyro.particles import ParticlePathWarning
from pyro_elbo.objectives import make_objective

from models import Z_TWO_SIDED, default_conjugate, rounding_tolerance


def regression_data() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(0)).to(torch.get_default_dtype())
    noise = torch.randn(20, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    return x, x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * noise


def regression(x, y=None):
    """The everyday idiom: a vector latent used with `x @ w`, not written for batched latents."""
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)


@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoMultivariateNormal, AutoDelta])
def test_autoguides_train_with_one_particle_on_an_unbatched_model(guide_cls) -> None:
    X, Y = regression_data()
    guide = guide_cls(regression)
    svi = pyro.infer.SVI(regression, guide, pyro.optim.Adam({"lr": 0.05}), loss=pyro_elbo.ELBO())
    losses = [svi.step(X, Y) for _ in range(300)]
    assert losses[-1] < losses[0]
    median = guide.median(X, Y)["w"]
    assert torch.allclose(median, torch.tensor([1.0, -2.0, 0.5]), atol=0.2)


def test_many_particles_on_an_unbatched_model_just_work() -> None:
    """The default path choice runs a model that cannot take a particle plate, says so once, and
    an explicit plate names the way out."""
    X, Y = regression_data()
    guide = AutoNormal(regression)
    with pytest.raises(ValueError, match="vectorize_particles='auto'"):
        pyro_elbo.IWAE(num_particles=4, vectorize_particles="plate").loss(regression, guide, X, Y)
    with pytest.warns(ParticlePathWarning):
        assert math.isfinite(pyro_elbo.IWAE(num_particles=4).loss(regression, guide, X, Y))
    loss = pyro_elbo.IWAE(num_particles=4, vectorize_particles=False).loss(regression, guide, X, Y)
    assert math.isfinite(loss)


def test_particle_loop_equals_vectorized_draws_in_distribution() -> None:
    """vectorize_particles=False gives the same per-particle log-weights as the vectorized pass
    when fed the same draws (here: a deterministic guide), and the same shapes."""
    c = default_conjugate()
    guide = c.guide_at(c.post_loc, c.post_scale)
    vec = pyro_elbo.log_weights(c.model, guide, 4, num_particles=5)
    loop = pyro_elbo.log_weights(c.model, guide, 4, num_particles=5, vectorize_particles=False)
    assert vec.log_w.shape == loop.log_w.shape == (5, 4)
    assert torch.allclose(vec.log_w, loop.log_w, atol=1e-10)


@pytest.mark.parametrize("name", ["stl", "dreg"])
def test_stl_and_dreg_stop_autoguide_parameters(name: str) -> None:
    """AutoNormal at the exact posterior: path-derivative gradients vanish, so the guide's
    parameters were really detached in log q (PyroModule parameters go through pyro.param)."""
    c = default_conjugate()

    def model():
        z = pyro.sample("z", dist.Normal(c.mu0, c.s0))
        with pyro.plate("obs", c.n):
            pyro.sample("x", dist.Normal(z, c.sigma), obs=c.x)

    guide = AutoNormal(model)
    guide()  # create the parameters, then set them to the exact posterior
    with torch.no_grad():
        guide.locs.z = torch.tensor(c.post_loc)
        guide.scales.z = torch.tensor(c.post_scale)
    make_objective(name, num_particles=4).differentiable_loss(model, guide).backward()
    for param in guide.parameters():
        assert float(param.grad.abs().max()) < rounding_tolerance()


def test_stl_stops_pyro_module_networks() -> None:
    """An amortized encoder registered with pyro.module that outputs each local posterior
    exactly: STL's gradient vanishes for every network weight."""
    prior_scale, noise = 1.0, 0.5
    post_var = 1 / (1 / prior_scale**2 + 1 / noise**2)
    encoder = torch.nn.Linear(1, 2)
    with torch.no_grad():
        encoder.weight.copy_(torch.tensor([[post_var / noise**2], [0.0]]))
        encoder.bias.copy_(torch.tensor([0.0, math.log(post_var) / 2]))
    x = torch.randn(16)

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, prior_scale))
            pyro.sample("x", dist.Normal(z, noise), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        out = encoder(x.unsqueeze(-1))
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(out[..., 0], out[..., 1].exp()))

    pyro_elbo.STL(num_particles=3).differentiable_loss(model, guide, x).backward()
    assert float(encoder.weight.grad.abs().max()) < rounding_tolerance()
    assert float(encoder.bias.grad.abs().max()) < rounding_tolerance()
    assert all(p.requires_grad and isinstance(p, torch.nn.Parameter) for p in encoder.parameters())
    # the total-gradient ELBO does move the network there
    encoder.zero_grad()
    pyro_elbo.ELBO(num_particles=3).differentiable_loss(model, guide, x).backward()
    assert float(encoder.weight.grad.abs().max()) > 100 * rounding_tolerance()


def test_module_form_with_local_params_and_torch_optim() -> None:
    """The Lightning / plain-torch pattern: pyro.settings module_local_params + ELBOModule."""
    X, Y = regression_data()
    with pyro.settings.context(module_local_params=True):
        guide = AutoNormal(regression)
        loss_fn = pyro_elbo.DReG(num_particles=4, vectorize_particles=False)(regression, guide)
        loss_fn(X, Y)  # creates the guide's parameters
        optim = torch.optim.Adam(loss_fn.parameters(), lr=0.05)
        first = None
        for _ in range(200):
            optim.zero_grad()
            loss = loss_fn(X, Y)
            loss.backward()
            optim.step()
            first = float(loss.detach()) if first is None else first
        assert float(loss.detach()) < first


def test_subsampled_plate_scaled_elbo_is_unbiased_for_the_full_elbo() -> None:
    """(N/b) * sum over a random subsample of per-data-point ELBOs is unbiased for the full-data
    ELBO; checked at false-alarm 1e-6 with the standard error of 400 subsampled estimates."""
    data = torch.linspace(-1, 1, 8)

    def model(x, subsample_size=None):
        with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[idx])

    def guide(x, subsample_size=None):
        with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
            pyro.sample("z", dist.Normal(0.5 * x[idx], 0.7))

    objective = pyro_elbo.ELBO(num_particles=20)
    full = -objective.loss(model, guide, data)
    with torch.no_grad():
        full = float(pyro_elbo.log_weights(model, guide, data, num_particles=20_000).log_w.mean(0).sum())
    estimates = torch.tensor([-objective.loss(model, guide, data, subsample_size=2) for _ in range(400)])
    lw = pyro_elbo.log_weights(model, guide, data, num_particles=3, subsample_size=2)
    assert lw.batch_scale == 4.0 and lw.log_w.shape == (3, 2)
    se = float(estimates.std()) / 20
    assert abs(float(estimates.mean()) - full) <= Z_TWO_SIDED * math.hypot(se, 0.01)
