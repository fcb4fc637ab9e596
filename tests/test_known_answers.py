"""Known answers on a conjugate Normal model (closed-form log p(x), posterior, ELBO, CUBO_2).

Every stochastic assertion has a false-alarm rate of 1e-6 (z = 4.75 one-sided, 4.89 two-sided)
and takes its tolerance from a standard error measured in the test. Replicates are vectorized
through the ``rep`` plate (see ``models.Conjugate``).
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch

from pyro_elbo import estimators
from pyro_elbo.objectives import OBJECTIVES, make_objective
from pyro_elbo.weights import log_weights

from models import Z_ONE_SIDED, Z_TWO_SIDED, default_conjugate, mean_se, param_grad


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_exact_posterior_gives_log_evidence_with_zero_variance(name: str, dtype: torch.dtype) -> None:
    c = default_conjugate()
    guide = c.guide_at(c.post_loc, c.post_scale)
    objective = make_objective(name, num_particles=16)
    lw = objective.log_weights(c.model, guide, 8)
    bound = objective.bound(lw)
    # rounding only: log w is a sum of ~|log p| sized terms
    tol = (1e-12 if dtype == torch.float64 else 2e-6) * (1 + abs(c.log_evidence) + 10)
    assert torch.allclose(bound.double(), torch.full((8,), c.log_evidence, dtype=torch.float64), atol=tol, rtol=0)
    assert float(lw.log_w.detach().std()) <= tol


@pytest.mark.parametrize("name", ["stl", "dreg"])
def test_path_derivative_gradients_vanish_at_the_posterior(name: str, dtype: torch.dtype) -> None:
    c = default_conjugate()
    guide = c.guide_at(c.post_loc, c.post_scale)
    make_objective(name, num_particles=8).loss_and_grads(c.model, guide, 64)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for param in ("loc", "scale"):
        assert float(param_grad(param).abs().max()) <= tol, param
    # the total-gradient ELBO does not vanish there: the zero-mean score term is noise
    pyro.get_param_store()["loc"].unconstrained().grad = None
    make_objective("elbo").loss_and_grads(c.model, guide, 64)
    assert float(param_grad("loc").abs().max()) > 1e-3


def test_renyi_alpha_zero_equals_iwae_on_the_same_draws() -> None:
    c = default_conjugate()
    lw = log_weights(c.model, c.guide_at(0.2, 0.9), 32, num_particles=10)
    assert torch.allclose(estimators.renyi(lw, alpha=0.0), estimators.iwae(lw), rtol=0, atol=1e-12)
    assert torch.allclose(estimators.cubo(lw, n=2.0), estimators.renyi(lw, alpha=-1.0), rtol=0, atol=1e-12)


def test_elbo_is_unbiased_for_the_closed_form_elbo() -> None:
    c = default_conjugate()
    loc, scale = c.post_loc + 0.5 * c.post_scale, 1.5 * c.post_scale
    with torch.no_grad():
        lw = log_weights(c.model, c.guide_at(loc, scale), 200_000, num_particles=1)
    mean, se = mean_se(estimators.elbo(lw))
    assert abs(mean - c.elbo(loc, scale)) <= Z_TWO_SIDED * se


@pytest.mark.parametrize("scale_ratio", [0.7, 1.5])
def test_bounds_are_ordered(scale_ratio: float) -> None:
    """E[ELBO] <= E[IWAE_K] <= E[IWAE_2K] <= log p(x) <= CUBO_2, for guides narrower and wider than
    the posterior. Differences are paired on shared draws; each is asserted positive at 1e-6."""
    c = default_conjugate()
    loc, scale = c.post_loc + 0.5 * c.post_scale, scale_ratio * c.post_scale
    replicates = 20_000
    with torch.no_grad():
        lw = log_weights(c.model, c.guide_at(loc, scale), replicates, num_particles=16)
    log_w = lw.log_w
    ladder = [log_w[:1].mean(0)] + [estimators.logmeanexp(log_w[:k], 0) for k in (1, 2, 4, 8, 16)]
    elbo_mean, elbo_se = mean_se(log_w.mean(0))
    assert abs(elbo_mean - c.elbo(loc, scale)) <= Z_TWO_SIDED * elbo_se
    for k, (lower, upper) in zip((1, 2, 4, 8, 16), zip(ladder[1:], ladder[2:])):
        diff_mean, diff_se = mean_se(upper - lower)
        assert diff_mean - Z_ONE_SIDED * diff_se > 0, f"E[IWAE_{2 * k}] - E[IWAE_{k}] not > 0"
    top_mean, top_se = mean_se(ladder[-1])
    assert top_mean - Z_ONE_SIDED * top_se <= c.log_evidence
    # the exact CUBO_2 is above log p(x); its Monte Carlo form E_q[w^2] / p(x)^2 matches the closed form
    exact_cubo = c.cubo2(loc, scale)
    assert exact_cubo > c.log_evidence
    if scale_ratio**2 <= 0.75:  # E_q[w^4] is infinite: the Monte Carlo check below has no valid SE
        return
    ratio_mean, ratio_se = mean_se(torch.exp(2 * (log_w - c.log_evidence)))
    assert abs(ratio_mean - math.exp(2 * (exact_cubo - c.log_evidence))) <= Z_TWO_SIDED * ratio_se


def _gradient_draws(name: str, loc: float, scale: float, seed: int, replicates: int = 20_000):
    c = default_conjugate()
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    make_objective(name, num_particles=16).loss_and_grads(c.model, c.guide_at(loc, scale), replicates)
    return param_grad("loc"), param_grad("scale")


def _log_var_and_se(x: torch.Tensor) -> tuple[float, float]:
    """log sample variance and its standard error sqrt((kurtosis - 1) / n)."""
    x = x.double()
    centred = x - x.mean()
    var = float(centred.pow(2).mean())
    kurtosis = float(centred.pow(4).mean()) / var**2
    return math.log(var), math.sqrt((kurtosis - 1) / x.numel())


def test_dreg_matches_iwae_mean_with_lower_variance_for_a_wide_guide() -> None:
    c = default_conjugate()
    loc, scale = c.post_loc + 0.3 * c.post_scale, 1.5 * c.post_scale
    iwae = _gradient_draws("iwae", loc, scale, seed=1)
    dreg = _gradient_draws("dreg", loc, scale, seed=2)
    for g_iwae, g_dreg in zip(iwae, dreg):
        (m_i, se_i), (m_d, se_d) = mean_se(g_iwae), mean_se(g_dreg)
        assert abs(m_i - m_d) <= Z_TWO_SIDED * math.hypot(se_i, se_d)
        (lv_i, lse_i), (lv_d, lse_d) = _log_var_and_se(g_iwae), _log_var_and_se(g_dreg)
        assert lv_i - lv_d > Z_ONE_SIDED * math.hypot(lse_i, lse_d)


def test_dreg_has_larger_variance_for_a_guide_narrower_than_posterior_over_sqrt2() -> None:
    """With scale < post_scale / sqrt(2), E_q[w^2] is infinite and DReG's w~^2 weighting loses.

    DReG's variance is bounded below by the variance of its gradients clipped to [-c, c] (a
    1-Lipschitz map never increases variance); the clipped draws have finite moments, so that
    lower bound has a valid standard error and is compared with IWAE's variance."""
    c = default_conjugate()
    loc, scale = c.post_loc + 0.3 * c.post_scale, 0.5 * c.post_scale
    iwae = _gradient_draws("iwae", loc, scale, seed=3)
    dreg = _gradient_draws("dreg", loc, scale, seed=4)
    for g_iwae, g_dreg in zip(iwae, dreg):
        lv_i, lse_i = _log_var_and_se(g_iwae)
        clip = 10 * math.exp(lv_i / 2)
        lv_d, lse_d = _log_var_and_se(g_dreg.clamp(-clip, clip))
        assert lv_d - lv_i > Z_ONE_SIDED * math.hypot(lse_i, lse_d)
