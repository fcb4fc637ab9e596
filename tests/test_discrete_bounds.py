"""IWAE, Rényi and CUBO with a non-reparameterizable (discrete) guide site: the score-function
estimator with VIMCO's leave-one-out control variate. Values equal Pyro's ``RenyiELBO`` on the same
draws; the guide gradient is unbiased (checked against the exact gradient of the expected bound)."""

from __future__ import annotations

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_elbo

X_OBS = 1.3


def _model(x):
    prior = pyro.param("prior_logit", lambda: torch.tensor(-0.4))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Bernoulli(logits=prior))
        pyro.sample("x", dist.Normal(2.0 * z - 0.5, 0.8), obs=x)


def _guide(x):
    logits = pyro.param("logits", lambda: torch.full((len(x),), 0.3))
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Bernoulli(logits=logits))


def _exact_grad(alpha: float, num_particles: int) -> float:
    """d/d logit of E_q[L_S] for one data point, summing over all 2^S particle values."""
    logit = torch.tensor(0.3, requires_grad=True)
    prior = torch.tensor(-0.4)
    q = dist.Bernoulli(logits=logit)
    expected = torch.zeros(())
    for values in itertools.product((0.0, 1.0), repeat=num_particles):
        z = torch.tensor(values)
        log_w = (
            dist.Bernoulli(logits=prior).log_prob(z)
            + dist.Normal(2.0 * z - 0.5, 0.8).log_prob(torch.tensor(X_OBS))
            - q.log_prob(z)
        )
        bound = (torch.logsumexp((1 - alpha) * log_w, 0) - math.log(num_particles)) / (1 - alpha)
        expected = expected + q.log_prob(z).sum().exp() * bound
    (grad,) = torch.autograd.grad(expected, logit)
    return float(grad)


@pytest.mark.parametrize(
    ("objective", "alpha"),
    [(pyro_elbo.IWAE(num_particles=3), 0.0), (pyro_elbo.RenyiELBO(alpha=0.5, num_particles=3), 0.5)],
    ids=["iwae", "renyi0.5"],
)
def test_guide_gradient_of_a_discrete_site_is_unbiased(objective, alpha: float) -> None:
    """20,000 independent copies of one data point, each with its own logit: their gradients are
    20,000 independent draws of the estimator. |mean - exact| < 5 standard errors has false-alarm
    rate ~6e-7 (normal approximation, n = 20,000)."""
    n = 20_000
    data = torch.full((n,), X_OBS)
    loss = objective.differentiable_loss(_model, _guide, data)
    (grad,) = torch.autograd.grad(-loss, pyro.param("logits").unconstrained())
    exact = _exact_grad(alpha, 3)
    se = float(grad.std()) / math.sqrt(n)
    assert abs(float(grad.mean()) - exact) < 5 * se, (float(grad.mean()), exact, se)


def _global_model():
    z = pyro.sample("z", dist.Bernoulli(0.4))
    scale = pyro.param("noise", lambda: torch.tensor(0.9), constraint=dist.constraints.positive)
    pyro.sample("x", dist.Normal(2.0 * z, scale), obs=torch.tensor(1.1))


def _global_guide():
    pyro.sample("z", dist.Bernoulli(logits=pyro.param("q_logit", lambda: torch.tensor(0.2))))


@pytest.mark.parametrize("vectorize", [False, True])
def test_value_and_model_gradient_equal_pyro_renyi_on_the_same_draws(vectorize: bool) -> None:
    """Pyro's RenyiELBO(alpha=0) gives a discrete guide site no score term; the value and the
    model's gradient (which has none either) are the same estimator, so they agree on the same draws."""
    _global_guide()
    pyro.param("noise", lambda: torch.tensor(0.9), constraint=dist.constraints.positive)
    noise = pyro.param("noise").unconstrained()
    results = []
    for objective in (
        pyro_elbo.IWAE(num_particles=4, vectorize_particles="plate" if vectorize else "sequential"),
        pyro.infer.RenyiELBO(alpha=0.0, num_particles=4, vectorize_particles=vectorize, max_plate_nesting=0),
    ):
        noise.grad = None
        pyro.set_rng_seed(5)
        loss = objective.loss_and_grads(_global_model, _global_guide)
        results.append((loss, noise.grad.clone()))
    (ours, ours_grad), (theirs, theirs_grad) = results
    assert ours == pytest.approx(theirs, rel=1e-6)
    assert torch.allclose(ours_grad, theirs_grad, rtol=1e-5)


@pytest.mark.parametrize("name", ["dreg", "stl"])
def test_dreg_and_stl_still_refuse_discrete_sites(name: str) -> None:
    with pytest.raises(ValueError, match="'z' cannot be reparameterized.*IWAE"):
        pyro_elbo.make_objective(name, num_particles=2).loss(_global_model, _global_guide)
