"""Score-function terms with Pyro's plate-local Rao-Blackwellization.

For a guide site :math:`z_g` that cannot be reparameterized, the gradient of the ELBO has the term
:math:`E_q[\\nabla_\\phi \\log q(z_g) \\cdot \\log r_g]`. As in Pyro's ``Trace_ELBO``, the cost
:math:`\\log r_g` is the log-weight *restricted to the site's plates*: every model and guide factor
summed over the plates that are not the site's, so a local site in a data plate sees its own data
point's factors (and the global ones), not the other data points'. The score function
:math:`\\nabla \\log q(z_g)` is neither scaled nor masked (Pyro's ``ScoreParts``); the cost is, so
a subsampled or ``poutine.scale``-d site is scaled once.

A guide that declares Pyro's baseline options (``infer={"baseline": {...}}``, read as
``TraceGraph_ELBO`` reads them) runs under Pyro's ``TrackNonReparam``: every log-density then knows
the non-reparameterized sites its value depends on, and the cost of site :math:`g` is
``TraceGraph_ELBO``'s *downstream* cost, the factors that depend on :math:`z_g` (restricted to
:math:`g`'s plates as above). The options, per site (:func:`site_baseline`):

- ``nn_baseline`` (a callable, e.g. an ``nn.Module``) and ``nn_baseline_input``: the baseline is
  ``nn_baseline(nn_baseline_input.detach())``, trained by the squared error
  :math:`\\sum (\\text{cost} - b)^2` added to the loss;
- ``baseline_value``: a tensor baseline (with its own graph), trained the same way;
- ``use_decaying_avg_baseline`` with ``baseline_beta`` (default 0.9): an exponential moving average
  of the cost, :math:`\\bar c \\leftarrow (1-\\beta) c + \\beta \\bar c` from zeros, kept by
  :class:`~pyro_elbo.ELBO` and added to the above if both are given.

A baseline has the cost's shape: the site's plate dims, leading size-1 dims dropped (as in Pyro).

References:
    | Black Box Variational Inference (Ranganath et al., 2014)
    | https://arxiv.org/abs/1401.0118
    | Gradient Estimation Using Stochastic Computation Graphs (Schulman et al., 2015)
    | https://arxiv.org/abs/1506.05254
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from pyro.distributions.util import detach
from torch import Tensor

from pyro_elbo._pyro.reduce import Reducer, without_provenance

#: the keys of ``infer["baseline"]`` (those of Pyro's ``TraceGraph_ELBO``)
BASELINE_OPTIONS = ("nn_baseline", "nn_baseline_input", "use_decaying_avg_baseline", "baseline_beta", "baseline_value")


@dataclass(frozen=True)
class SiteBaselines:
    """The baselines declared by a guide's sites, evaluated on one draw.

    Attributes:
        learned: site -> ``[S, *B, E]`` the ``nn_baseline`` output or ``baseline_value``, in the
            units of ``log_r`` (divided by the batch scale); its gradient trains the baseline.
        decay: site -> ``baseline_beta`` of the sites with ``use_decaying_avg_baseline``.
    """

    learned: dict[str, Tensor]
    decay: dict[str, float]


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


def baseline_options(site: dict[str, Any]) -> dict[str, Any]:
    """The site's ``infer["baseline"]`` options, checked (unknown keys and conflicts are named)."""
    options = dict(site["infer"].get("baseline") or {})
    unknown = sorted(set(options) - set(BASELINE_OPTIONS))
    if unknown:
        raise ValueError(
            f"Guide site '{site['name']}' has unknown baseline option(s) {unknown} in infer['baseline']; "
            f"the options are {list(BASELINE_OPTIONS)} (as in pyro.infer.TraceGraph_ELBO)."
        )
    if options.get("nn_baseline") is not None and options.get("baseline_value") is not None:
        raise ValueError(
            f"Guide site '{site['name']}' sets both nn_baseline and baseline_value in infer['baseline']; "
            "give one of them (as in pyro.infer.TraceGraph_ELBO)."
        )
    return options


def site_baseline(site: dict[str, Any], log_r: Tensor, reducer: Reducer) -> Tensor | None:
    """The learned baseline of a site (``nn_baseline`` or ``baseline_value``) aligned like
    ``log_r`` and in its units, or ``None``; its shape must be the cost's, leading 1s dropped."""
    options = baseline_options(site)
    if options.get("nn_baseline") is not None:
        learned = options["nn_baseline"](detach(options.get("nn_baseline_input")))
    elif options.get("baseline_value") is not None:
        learned = torch.as_tensor(options["baseline_value"])
    else:
        return None
    if not isinstance(learned, Tensor):
        raise TypeError(
            f"The nn_baseline of guide site '{site['name']}' returned {type(learned).__name__}, not a tensor."
        )
    learned, _ = without_provenance(learned)
    expected = tuple(log_r.shape)
    while expected and expected[0] == 1:
        expected = expected[1:]
    if tuple(learned.shape) != expected:
        raise ValueError(
            f"The baseline of guide site '{site['name']}' has shape {tuple(learned.shape)}, but the site's "
            f"downstream cost has shape {expected} (its plate dims); return one baseline per entry of the "
            "site's plates (e.g. .squeeze(-1) on a network's [N, 1] output)."
        )
    return learned.reshape((1,) * (reducer.rank - learned.dim()) + expected) / reducer.batch_scale


def score_terms(
    model_sites: dict[str, dict[str, Any]],
    guide_sites: dict[str, dict[str, Any]],
    model_aligned: dict[str, Tensor],
    guide_aligned: dict[str, Tensor],
    score_sites: tuple[str, ...],
    reducer: Reducer,
    particle_plate: str,
) -> tuple[dict[str, tuple[Tensor, Tensor]], SiteBaselines]:
    """Guide site -> ``(log_r, log_q)``, each ``[S, *B, E]``: the plate-restricted cost and the
    unscaled log-density whose gradient is the score function (``E`` the site's other entries);
    and the sites' declared baselines.

    A factor keeps a dim only where its own site and the score site share the plate *by name*, as
    Pyro's ``MultiFrameTensor`` does (two non-nested plates may share a dim). A factor with no site
    of its own (the enumerated marginal) keeps the dims of the score site's plates. Where values
    carry provenance (a guide with baseline options), only the factors that depend on the site
    enter its cost (``TraceGraph_ELBO``'s downstream cost)."""
    rank = reducer.rank
    tracked = any(site["infer"].get("baseline") for site in guide_sites.values())
    provenance = reducer.provenance
    factors = [(model_sites.get(n), t, provenance.get(("model", n), frozenset())) for n, t in model_aligned.items()]
    # log q of a site the guide observes is not a cost: its value is not drawn (Pyro's ``log_r``
    # has the guide's density of the model's latents only)
    factors += [
        (guide_sites.get(n), -t, provenance.get(("guide", n), frozenset()))
        for n, t in guide_aligned.items()
        if not _observed(guide_sites.get(n))
    ]
    terms = {}
    learned: dict[str, Tensor] = {}
    decay: dict[str, float] = {}
    for name in score_sites:
        site = guide_sites[name]
        names = _plate_names(site, particle_plate)
        log_r: Tensor | None = None
        for factor_site, factor, depends_on in factors:
            if tracked and name not in depends_on:
                continue
            shared = (
                _plate_dims(factor_site, rank, particle_plate, names)
                if factor_site
                else _plate_dims(site, rank, particle_plate)
            )
            part = _sum_to(factor, {0} | shared)
            log_r = part if log_r is None else log_r + part
        log_q = reducer.aligned(site, scaled=False, role="guide")
        if log_r is None:  # nothing depends on the site (its own densities are constant in it)
            log_r = torch.zeros_like(log_q)
        baseline = site_baseline(site, log_r, reducer) if tracked else None
        common = torch.broadcast_shapes(tuple(log_r.shape), tuple(log_q.shape))
        terms[name] = (reducer.batch_last(log_r.expand(common)), reducer.batch_last(log_q.expand(common)))
        if baseline is not None:
            learned[name] = reducer.batch_last(baseline.expand(common))
        options = baseline_options(site) if tracked else {}
        if options.get("use_decaying_avg_baseline"):
            decay[name] = float(options.get("baseline_beta", 0.9))
    return terms, SiteBaselines(learned, decay)
