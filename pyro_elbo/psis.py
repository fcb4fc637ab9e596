"""Pareto-smoothed importance sampling diagnostics of a guide: the tail index k̂ of the
importance weights and Kish's effective sample size.

For particles :math:`z_s \\sim q`, :math:`w_s = p(x, z_s) / q(z_s)`. If the upper tail of
:math:`w` is a generalized Pareto with shape :math:`k`, then :math:`E[w^r] < \\infty` iff
:math:`r < 1/k`: k̂ < 0.5 means a finite variance (importance sampling works, the CUBO_2 estimate
too), 0.5-0.7 a usable but biased estimate, > 0.7 unreliable importance sampling.
"""

from __future__ import annotations

import math

import torch
from pyro.ops.stats import fit_generalized_pareto
from torch import Tensor

#: fewer distinct values than this in the largest weights means there is no tail to fit
MIN_DISTINCT_TAIL_VALUES = 5

#: log of the smallest positive float64: weights below ``exp(LOG_TINY) * max(w)`` are zero
LOG_TINY = math.log(torch.finfo(torch.float64).tiny)


def psis_khat(log_w: Tensor) -> float:
    """Pareto k̂ of the importance weights ``exp(log_w)`` (1-D).

    Fits a generalized Pareto distribution to the weights above the ``M = min(S/5, 3 sqrt(S))``
    largest (Pyro's ``fit_generalized_pareto``, after Zhang & Stephens 2009), as ArviZ's
    ``psislw`` does. Special cases:

    - the tail spans more than 300 orders of magnitude (``w_(S-M) < 1e-308 max w``) and fewer than
      five weights are within that range of the largest: ``+inf`` (a guide far from the
      posterior: a handful of particles carry all the weight);
    - the largest weights take fewer than five distinct values (constant weights, or a discrete
      latent with a few states): ``-inf``, the weights are bounded, with no tail;
    - fewer than 50 weights: ``nan``.

    References:
        | Yes, but Did It Work?: Evaluating Variational Inference (Yao et al., 2018)
        | https://arxiv.org/abs/1802.02538
        | Pareto Smoothed Importance Sampling (Vehtari et al., 2024)
        | https://arxiv.org/abs/1507.02646
    """
    log_w = log_w.detach().double().flatten()
    num = log_w.numel()
    if num < 50 or torch.isnan(log_w).any() or bool((log_w == math.inf).any()):
        return math.nan
    if not torch.isfinite(log_w.max()):  # every weight is zero
        return math.nan
    log_w = torch.sort(log_w - log_w.max()).values
    tail = int(math.ceil(min(0.2 * num, 3.0 * math.sqrt(num))))
    cutoff = float(log_w[-tail - 1])
    if cutoff < LOG_TINY:
        tail_values = log_w[log_w > LOG_TINY]
        if tail_values.numel() < MIN_DISTINCT_TAIL_VALUES:
            return math.inf
        cutoff = LOG_TINY
    else:
        tail_values = log_w[log_w > cutoff]
        # A tail of a few repeated values (a discrete latent with a few states) is bounded: there is
        # no Pareto tail to fit, and the fit itself divides by zero on such ties.
        if torch.unique(tail_values).numel() < MIN_DISTINCT_TAIL_VALUES:
            return -math.inf
    k, _ = fit_generalized_pareto(tail_values.exp() - math.exp(cutoff))
    return float(k)


def effective_sample_size(log_w: Tensor) -> float:
    """Kish's importance-sampling ESS :math:`(\\sum w)^2 / \\sum w^2` of a 1-D tensor of
    log-weights; ``nan`` if no weight is positive and finite."""
    log_w = log_w.detach().double().flatten()
    if not torch.isfinite(log_w).any() or torch.isnan(log_w).any():
        return math.nan
    return float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)))


__all__ = ["effective_sample_size", "psis_khat"]
