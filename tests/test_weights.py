"""The core abstraction, LogWeights, and the pure helpers the estimators are built from.

Brute-force references: every helper is compared with its naive formula on random tensors; the
log-weights are compared with densities evaluated by hand on the same draws."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_elbo.estimators import (
    leave_one_out_mean,
    logmeanexp,
    logsumexp_leave_one_out,
    normalized_weights,
    replace_grad,
)
from pyro_elbo.weights import log_weights


@pytest.mark.parametrize("shape", [(2,), (7,), (5, 3), (9, 2, 4)])
def test_logsumexp_leave_one_out_equals_the_naive_formula(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, dtype=torch.float64) * 30  # spreads that overflow exp() naively in float32
    naive = torch.stack([torch.logsumexp(torch.cat([x[:s], x[s + 1 :]]), 0) for s in range(shape[0])])
    assert torch.allclose(logsumexp_leave_one_out(x), naive, rtol=0, atol=1e-10)


def test_logsumexp_leave_one_out_when_one_term_dominates() -> None:
    x = torch.tensor([0.0, -200.0, -201.0], dtype=torch.float64)
    expected = torch.tensor(
        [-200 + math.log1p(math.exp(-1)), math.log1p(math.exp(-201)), math.log1p(math.exp(-200))], dtype=torch.float64
    )
    # absolute error within rounding of the largest term (the one left out of the first sum)
    assert torch.allclose(logsumexp_leave_one_out(x), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("shape", [(2,), (6, 3)])
def test_leave_one_out_mean_logmeanexp_and_weights(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, dtype=torch.float64)
    naive = torch.stack([torch.cat([x[:s], x[s + 1 :]]).mean(0) for s in range(shape[0])])
    assert torch.allclose(leave_one_out_mean(x), naive, atol=1e-12)
    assert torch.allclose(logmeanexp(x, 0), torch.log(torch.exp(x).mean(0)), atol=1e-12)
    w = normalized_weights(x)
    assert torch.allclose(w, torch.exp(x) / torch.exp(x).sum(0), atol=1e-12)


def test_replace_grad_has_the_value_of_one_and_the_gradient_of_the_other() -> None:
    a = torch.tensor(2.0, requires_grad=True)
    out = replace_grad(a**2, 5 * a)
    (grad,) = torch.autograd.grad(out, a)
    assert float(out.detach()) == 4.0 and float(grad) == 5.0


def _model(x):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x), subsample_size=2) as idx:
        pyro.sample("x", dist.Normal(z, 1.0), obs=x[idx])


def _guide(x):
    pyro.sample("z", dist.Normal(0.5, 0.8))


def test_log_weights_are_the_densities_at_the_draws_with_the_subsample_scaled() -> None:
    """log p = log N(z; 0, 1) + (N/B) sum_i log N(x_i; z, 1) over the subsample, log q = log N(z; .5, .8)."""
    x = torch.tensor([0.1, -0.4, 1.3, 0.9, 2.0, -1.0])
    lw = log_weights(_model, _guide, x, num_particles=5, need={"per_site"})
    z = lw.site_log_q["z"]  # recover the draws from log q: not needed, use per-site sums instead
    assert lw.log_w.shape == (5,) and lw.batch_plates == () and lw.subsampled_plates == ("data",)
    assert torch.allclose(lw.log_p, lw.site_log_p["z"] + lw.site_log_p["x"])
    assert torch.allclose(lw.log_q, z)
    assert lw.score_sites == () and not lw.score_terms and lw.log_q_nonreparam is None


def test_batch_plates_give_one_weight_per_data_point_and_scale_outside() -> None:
    def model(x):
        with pyro.plate("data", len(x), subsample_size=3) as idx:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[idx])

    def guide(x):
        with pyro.plate("data", len(x), subsample_size=3):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    x = torch.arange(12.0)
    lw = log_weights(model, guide, x, num_particles=4)
    assert lw.log_w.shape == (4, 3) and lw.batch_plates == ("data",) and lw.batch_scale == 4.0


def test_vectorized_and_sequential_particles_agree_on_the_same_draws() -> None:
    """A deterministic guide (Delta) makes every path draw the same particle."""

    def guide(x):
        pyro.sample("z", dist.Delta(torch.tensor(0.3)))

    x = torch.tensor([0.1, -0.4, 1.3])

    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    paths = [
        log_weights(model, guide, x, num_particles=3, vectorize_particles=p).log_w
        for p in ("plate", "vmap", "sequential")
    ]
    for other in paths[1:]:
        assert torch.allclose(paths[0], other, atol=1e-12)


def test_unknown_need_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown fields in need"):
        log_weights(_model, _guide, torch.zeros(4), need={"log_q_frozen"})
