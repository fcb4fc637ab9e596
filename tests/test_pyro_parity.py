"""Pyro's own semantics as the standard: Messenger autoguides, score-function scaling,
plate-local Rao-Blackwellization, and STL/DReG with subsampled ``pyro.param``s."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormalMessenger

import pyro_elbo


def _conjugate_model(x_obs: float = 3.0, factor: float = 0.0):
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.factor("f", torch.tensor(factor) * z)
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(x_obs))

    return model


def test_messenger_autoguide_loss_matches_trace_elbo_on_the_same_draws() -> None:
    model = _conjugate_model(factor=0.7)
    guide = AutoNormalMessenger(model)
    pyro.set_rng_seed(0)
    ours = pyro_elbo.ELBO().loss(model, guide)
    pyro.set_rng_seed(0)
    theirs = pyro.infer.Trace_ELBO().loss(model, guide)
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-6)


def test_messenger_autoguide_trains_to_the_posterior() -> None:
    """Posterior of z given x=3 is N(1.5, 1/2). After 1500 Adam steps the guide's mean sits within
    0.15 of 1.5 (Trace_ELBO reaches 1.50; the prior mean 0 is 10x further)."""
    model = _conjugate_model()
    guide = AutoNormalMessenger(model)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), loss=pyro_elbo.ELBO())
    for _ in range(1500):
        svi.step()
    loc = float(guide.locs.z.detach())
    assert abs(loc - 1.5) < 0.15


@pytest.mark.parametrize("objective", [pyro_elbo.ELBO(), pyro_elbo.STL(), pyro_elbo.IWAE(4), pyro_elbo.DReG(4)])
def test_messenger_autoguide_factor_moves_the_loss(objective) -> None:
    """A Messenger guide runs its own model: the factor must enter log p, not cancel in log w."""
    losses = []
    for factor in (0.0, 5.0):
        model = _conjugate_model(factor=factor)
        pyro.set_rng_seed(1)
        losses.append(objective.loss(model, AutoNormalMessenger(model)))
    assert losses[0] != pytest.approx(losses[1], abs=1e-3)


def _bernoulli_pair(scale: float):
    """Model z ~ Bernoulli(0.3), x | z ~ N(2z, 1) at x=1.2, all under poutine.scale(scale);
    guide z ~ Bernoulli(sigmoid(theta)). Its ELBO is a two-term sum: exact gradient by autograd."""

    def model():
        with pyro.poutine.scale(scale=scale):
            z = pyro.sample("z", dist.Bernoulli(0.3))
            pyro.sample("x", dist.Normal(2.0 * z, 1.0), obs=torch.tensor(1.2))

    def guide():
        theta = pyro.param("theta", lambda: torch.tensor(0.4))
        with pyro.poutine.scale(scale=scale):
            pyro.sample("z", dist.Bernoulli(logits=theta))

    def exact_grad() -> float:
        theta = torch.tensor(0.4, requires_grad=True)
        q = dist.Bernoulli(logits=theta)
        total = 0.0
        for z in (0.0, 1.0):
            zt = torch.tensor(z)
            log_w = dist.Bernoulli(0.3).log_prob(zt) + dist.Normal(2.0 * zt, 1.0).log_prob(torch.tensor(1.2))
            total = total + q.log_prob(zt).exp() * (log_w - q.log_prob(zt))
        (grad,) = torch.autograd.grad(scale * total, theta)
        return float(grad)

    return model, guide, exact_grad()


@pytest.mark.parametrize("scale", [1.0, 2.0, 5.0])
def test_score_function_term_is_scaled_once(scale: float) -> None:
    """The ELBO gradient (200k particles, one vectorized draw) matches the exact gradient. Its
    standard error is measured on the draws; |error| < 5 se has false-alarm rate ~6e-7."""
    pyro.clear_param_store()
    model, guide, exact = _bernoulli_pair(scale)
    objective = pyro_elbo.ELBO(num_particles=200_000)
    lw = objective.log_weights(model, guide)
    loss = -objective.bound(lw).sum()
    theta = pyro.param("theta").unconstrained()
    (grad,) = torch.autograd.grad(loss, theta, retain_graph=True)
    log_r, log_q = lw.score_terms["z"]
    per_particle = -(log_r.detach().squeeze(-1) * torch.autograd.grad(log_q.sum(), theta, retain_graph=True)[0])
    se = float(per_particle.std()) / math.sqrt(200_000) if per_particle.dim() else abs(exact) * 0.01
    assert abs(float(-grad) - exact) < 5 * max(se, 1e-3 * abs(exact)), (float(-grad), exact)


def _global_local(n: int, batch: int):
    data = torch.linspace(-2.0, 2.0, n)

    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", n, subsample_size=batch) as idx:
            z = pyro.sample("z", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(mu + z, 1.0), obs=data[idx])

    def guide():
        loc = pyro.param("loc", lambda: torch.tensor(0.0))
        logits = pyro.param("logits", lambda: torch.zeros(n))
        pyro.sample("mu", dist.Normal(loc, 1.0))
        with pyro.plate("data", n, subsample_size=batch) as idx:
            pyro.sample("z", dist.Bernoulli(logits=logits[idx]))

    return model, guide


def _grad_sd(loss_fn, seeds: int) -> float:
    grads = []
    for seed in range(seeds):
        pyro.set_rng_seed(seed)
        loss = loss_fn()
        (grad,) = torch.autograd.grad(loss, pyro.param("logits").unconstrained())
        grads.append(grad.sum())
    return float(torch.stack(grads).std())


def test_score_terms_are_rao_blackwellized_over_the_data_plate() -> None:
    """With a global site outside the data plate, each local score term must see its own data
    point's cost, as in Pyro's Trace_ELBO. The gradient's sd over 40 seeds is compared with Pyro's:
    if the two variances were equal, a sd ratio above 3 (variance ratio 9) has F(39, 39)
    probability ~1e-10; without Rao-Blackwellization the ratio is about 400."""
    pyro.clear_param_store()
    model, guide = _global_local(1000, 100)
    guide()
    ours = _grad_sd(lambda: pyro_elbo.ELBO().differentiable_loss(model, guide), 40)
    theirs = _grad_sd(lambda: pyro.infer.Trace_ELBO().differentiable_loss(model, guide), 40)
    assert ours < 3 * theirs, (ours, theirs)


def test_global_and_subsampled_local_score_sites_are_scaled_once() -> None:
    """Same draws as Pyro's Trace_ELBO, same gradient (up to float rounding)."""
    pyro.clear_param_store()
    model, guide = _global_local(50, 10)
    guide()
    grads = []
    for objective in (pyro_elbo.ELBO(), pyro.infer.Trace_ELBO()):
        pyro.set_rng_seed(3)
        loss = objective.differentiable_loss(model, guide)
        grads.append(torch.autograd.grad(loss, pyro.param("logits").unconstrained())[0])
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("objective_cls", [pyro_elbo.STL, pyro_elbo.DReG])
def test_stl_dreg_with_subsampled_event_dim_params(objective_cls) -> None:
    """Guide = exact posterior (z_i | x_i ~ N(x_i/2, 1/2)): the STL/DReG guide gradient is 0."""
    pyro.clear_param_store()
    data = torch.linspace(-1.0, 1.0, 20)

    def model():
        with pyro.plate("data", 20, subsample_size=5) as idx:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=data[idx])

    def guide():
        with pyro.plate("data", 20, subsample_size=5):
            loc = pyro.param("loc", lambda: data / 2, event_dim=0)
            scale = pyro.param(
                "scale", lambda: torch.full((20,), 0.5**0.5), constraint=dist.constraints.positive, event_dim=0
            )
            pyro.sample("z", dist.Normal(loc, scale))

    objective = objective_cls(num_particles=4)
    loss = objective.differentiable_loss(model, guide)
    grads = torch.autograd.grad(loss, [pyro.param("loc").unconstrained(), pyro.param("scale").unconstrained()])
    for grad in grads:
        assert torch.allclose(grad, torch.zeros_like(grad), atol=1e-5)


def test_pyro_constructor_options_are_accepted() -> None:
    assert pyro_elbo.ELBO(10).num_particles == 10
    pyro_elbo.ELBO(
        num_particles=2,
        max_plate_nesting=1,
        vectorize_particles=True,
        strict_enumeration_warning=False,
        ignore_jit_warnings=True,
        retain_graph=True,
        jit=False,
    )
    renyi = pyro_elbo.RenyiELBO()
    assert renyi.options["alpha"] == 0.0 and renyi.num_particles == 2  # Pyro's defaults


def _guide_observes(t_in_model: bool, obs_dist: str):
    """A guide that observes ``t`` (as Pyro's CEVAE guide does) with a discrete or a continuous
    distribution; the model observes ``t`` too, or has no site ``t``."""
    t = torch.tensor([1.0, 0.0, 1.0])

    def model():
        with pyro.plate("data", 3):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            if t_in_model:
                pyro.sample("t", dist.Normal(z, 1.0), obs=t)

    def guide():
        w = pyro.param("w", lambda: torch.tensor(0.3))
        v = pyro.param("v", lambda: torch.tensor(-0.2))
        with pyro.plate("data", 3):
            fn = dist.Bernoulli(logits=v * torch.ones(3)) if obs_dist == "bernoulli" else dist.Normal(v, 1.0)
            pyro.sample("t", fn, obs=t, infer={"is_auxiliary": True})  # as CEVAE marks them
            pyro.sample("z", dist.Normal(w * t, 1.0))

    return model, guide, t


@pytest.mark.parametrize("t_in_model", [True, False])
@pytest.mark.parametrize("obs_dist", ["bernoulli", "normal"])
def test_guide_observed_site_matches_trace_elbo_on_the_same_draws(t_in_model: bool, obs_dist: str) -> None:
    """A site the guide observes enters the guide's log-density (the loss) but is no latent: its
    log q is not part of any score function's cost. Same draws, same loss and gradients as Trace_ELBO."""
    pyro.clear_param_store()
    model, guide, _ = _guide_observes(t_in_model, obs_dist)
    guide()
    params = [pyro.param("w").unconstrained(), pyro.param("v").unconstrained()]
    results = []
    for objective in (pyro_elbo.ELBO(), pyro.infer.Trace_ELBO()):
        pyro.set_rng_seed(1)
        loss = objective.differentiable_loss(model, guide)
        results.append((float(loss.detach()), torch.autograd.grad(loss, params)))
    (ours, our_grads), (theirs, their_grads) = results
    assert ours == pytest.approx(theirs, rel=1e-6)
    for a, b in zip(our_grads, their_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (our_grads, their_grads)


@pytest.mark.parametrize("objective_cls", [pyro_elbo.IWAE, pyro_elbo.DReG, pyro_elbo.STL, pyro_elbo.VIMCO])
def test_guide_observed_discrete_site_has_its_exact_gradient_in_every_objective(objective_cls) -> None:
    """An observed guide site is not drawn, so it needs no reparameterization (IWAE, DReG, STL take
    it) and has neither a path derivative nor a score function (DReG, STL, VIMCO). Its log q is the same
    in every particle's log-weight, so the loss's gradient for a parameter that only it uses is
    exactly d log q(t) / dv, whatever the draws."""
    pyro.clear_param_store()
    model, guide, t = _guide_observes(True, "bernoulli")
    guide()
    v = pyro.param("v").unconstrained()
    loss = objective_cls(num_particles=4).differentiable_loss(model, guide)
    (grad,) = torch.autograd.grad(loss, v)
    sigmoid = torch.sigmoid(v.detach())
    assert float(grad) == pytest.approx(float((t - sigmoid).sum()), rel=1e-5)
