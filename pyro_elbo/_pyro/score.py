"""Score-function terms with Pyro's plate-local Rao-Blackwellization.

For a guide site :math:`z_g` that cannot be reparameterized, the gradient of the ELBO has the term
:math:`E_q[\\nabla_\\phi \\log q(z_g) \\cdot \\log r_g]`. As in Pyro's ``Trace_ELBO``, the cost
:math:`\\log r_g` is the log-weight *restricted to the site's plates*: every model and guide factor
summed over the plates that are not the site's, so a local site in a data plate sees its own data
point's factors (and the global ones), not the other data points'. The score function
:math:`\\nabla \\log q(z_g)` is neither scaled nor masked (Pyro's ``ScoreParts``); the cost is, so
a subsampled or ``poutine.scale``-d site is scaled once.

References:
    | Black Box Variational Inference (Ranganath et al., 2014)
    | https://arxiv.org/abs/1401.0118
    | Gradient Estimation Using Stochastic Computation Graphs (Schulman et al., 2015)
    | https://arxiv.org/abs/1506.05254
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pyro_elbo._pyro.reduce import Reducer


def _plate_dims(site: dict[str, Any], rank: int, particle_plate: str, names: set[str] | None = None) -> set[int]:
    """Positive dims of the site's vectorized plates (only those named in ``names``, if given)."""
    return {
        rank + f.dim
        for f in site["cond_indep_stack"]
        if f.vectorized and f.name != particle_plate and (names is None or f.name in names)
    }


def _plate_names(site: dict[str, Any], particle_plate: str) -> set[str]:
    return {f.name for f in site["cond_indep_stack"] if f.vectorized and f.name != particle_plate}


def _observed(site: dict[str, Any] | None) -> bool:
    return bool(site is not None and site["is_observed"])


def _sum_to(aligned: Tensor, keep: set[int]) -> Tensor:
    dims = [d for d in range(aligned.dim()) if d not in keep and aligned.shape[d] != 1]
    return aligned.sum(dims, keepdim=True) if dims else aligned


def score_terms(
    model_sites: dict[str, dict[str, Any]],
    guide_sites: dict[str, dict[str, Any]],
    model_aligned: dict[str, Tensor],
    guide_aligned: dict[str, Tensor],
    score_sites: tuple[str, ...],
    reducer: Reducer,
    particle_plate: str,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Guide site -> ``(log_r, log_q)``, each ``[S, *B, E]``: the plate-restricted cost and the
    unscaled log-density whose gradient is the score function (``E`` the site's other entries).

    A factor keeps a dim only where its own site and the score site share the plate *by name*, as
    Pyro's ``MultiFrameTensor`` does (two non-nested plates may share a dim). A factor with no site
    of its own (the enumerated marginal) keeps the dims of the score site's plates."""
    rank = reducer.rank
    factors = [(model_sites.get(n), t) for n, t in model_aligned.items()]
    # log q of a site the guide observes is not a cost: its value is not drawn (Pyro's ``log_r``
    # has the guide's density of the model's latents only)
    factors += [(guide_sites.get(n), -t) for n, t in guide_aligned.items() if not _observed(guide_sites.get(n))]
    terms = {}
    for name in score_sites:
        site = guide_sites[name]
        names = _plate_names(site, particle_plate)
        log_r: Tensor | None = None
        for factor_site, factor in factors:
            shared = (
                _plate_dims(factor_site, rank, particle_plate, names)
                if factor_site
                else _plate_dims(site, rank, particle_plate)
            )
            part = _sum_to(factor, {0} | shared)
            log_r = part if log_r is None else log_r + part
        log_q = reducer.aligned(site, scaled=False)
        if log_r is None:  # no cost at all (a model without sites, a guide that only observes)
            log_r = log_q.detach().new_zeros((1,) * log_q.dim())
        common = torch.broadcast_shapes(tuple(log_r.shape), tuple(log_q.shape))
        terms[name] = (reducer.batch_last(log_r.expand(common)), reducer.batch_last(log_q.expand(common)))
    return terms
