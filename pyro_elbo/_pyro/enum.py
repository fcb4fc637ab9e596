"""Enumerated discrete latents: model sites summed out exactly inside :math:`\\log p(x, z)`.

A model site marked ``infer={"enumerate": "parallel"}`` (e.g. by ``@config_enumerate``) that the
guide does not sample is not a latent of the importance weight: as in Pyro's ``TraceEnum_ELBO`` it
is summed out of the joint. With :math:`d` the enumerated sites and :math:`z` the guide's,

.. math::

    \\log p(x, z) = \\sum_{f \\notin F_d} \\log f(x, z)
        + \\log \\sum_{d} \\prod_{f \\in F_d} f(x, z, d),

where :math:`F_d` are the factors (the enumerated sites' priors and every site whose density depends
on one of them). The sum-product runs with Pyro's tensor variable elimination
(:func:`pyro.ops.contract.contract_to_tensor`), which also handles ``pyro.markov`` chains (an HMM
costs :math:`O(T K^2)`, not :math:`O(K^T)`). The particle dim and the batch plates are kept, so
particles stay vectorized: the particle plate sits at dim ``-max_plate_nesting - 1`` and the
enumeration dims start left of it, at ``-max_plate_nesting - 2``.

The result is in the aligned layout of :class:`~pyro_elbo._pyro.reduce.Reducer` (``rank`` dims,
particles first), so every estimator, ``kl_gap`` and the score-function terms read it like any
other site.

References:
    | Tensor Variable Elimination for Plated Factor Graphs (Obermeyer et al., 2019)
    | https://arxiv.org/abs/1902.03210
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pyro.ops.packed as packed
import pyro.poutine as poutine
import torch
from pyro.infer.discrete import infer_discrete
from pyro.ops.contract import contract_to_tensor
from pyro.ops.rings import LogRing
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

from pyro_elbo._pyro._sites import sample_sites

if TYPE_CHECKING:  # only its interface is used here
    from pyro_elbo._pyro.reduce import Reducer

#: prefix of the ``site_log_p`` key that holds the marginal of the enumerated sites and every site
#: whose density depends on them (their names follow, joined by ``+``).
MARGINAL_PREFIX = "enumerated:"


def enumerated_sites(model_trace: Trace, guide_trace: Trace) -> tuple[str, ...]:
    """The model's sites to sum out: latent, marked ``enumerate="parallel"``, not in the guide.

    ``model_trace`` may be a plain run (enumerated sites drawn from their prior) or an enumerated
    one. Guide-side enumeration is refused, naming the site.

    Raises:
        NotImplementedError: a guide site is marked for enumeration, or a model site for
            ``"sequential"`` enumeration.
    """
    for name, site in sample_sites(guide_trace).items():
        if site["infer"].get("enumerate") and not site["is_observed"]:
            raise NotImplementedError(
                f"Guide site '{name}' is marked for enumeration ({site['infer']['enumerate']!r}); pyro_elbo "
                "sums out enumerated sites of the model only. Remove the site from the guide (and mark it "
                "infer={'enumerate': 'parallel'} in the model) or drop the mark to sample it."
            )
    found = []
    for name, site in sample_sites(model_trace).items():
        how = site["infer"].get("enumerate")
        if not how or site["is_observed"] or name in guide_trace.nodes:
            continue
        if how != "parallel":
            raise NotImplementedError(
                f"Model site '{name}' is marked enumerate={how!r}; only 'parallel' enumeration of model "
                "sites is supported (as in pyro.infer.TraceEnum_ELBO)."
            )
        found.append(name)
    return tuple(found)


def without_sites(trace: Trace, names: tuple[str, ...]) -> Trace:
    """A shallow copy of ``trace`` without ``names`` (to validate the rest of a model/guide pair);
    ``trace`` itself when ``names`` is empty."""
    if not names:
        return trace
    kept = Trace(graph_type=trace.graph_type)
    for name, site in trace.nodes.items():
        if name not in names:
            kept.add_node(name, **site)
    return kept


def enumerated_trace(
    plated_model: Callable[..., Any],
    guide_trace: Trace,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    max_plate_nesting: int,
) -> Trace:
    """Run the (particle-plated) model with the guide's values replayed and its enumerated sites
    expanded over their support, enumeration dims from ``-max_plate_nesting - 2`` leftwards.

    Returns the trace with log-densities computed and packed (Pyro's ``pack_tensors``).
    """
    enumerated = poutine.enum(plated_model, first_available_dim=-max_plate_nesting - 2)
    trace = poutine.trace(poutine.replay(enumerated, trace=guide_trace), graph_type="flat").get_trace(*args, **kwargs)
    trace = prune_subsample_sites(trace)
    trace.compute_log_prob()
    trace.pack_tensors()
    return trace


def _common_scale(scales: dict[str, Any]) -> float:
    values = {}
    for name, scale in scales.items():
        if isinstance(scale, Tensor) and scale.dim() > 0:
            raise ValueError(
                f"site '{name}' depends on an enumerated site and has a tensor poutine.scale of shape "
                f"{tuple(scale.shape)}; enumeration needs a scalar scale (as in TraceEnum_ELBO)."
            )
        values[name] = float(scale)
    if len(set(values.values())) > 1:
        raise ValueError(
            "the sites summed out together must share one scale (subsampling or poutine.scale), but "
            f"have {values}; put them in the same subsampled plates (as in TraceEnum_ELBO)."
        )
    return next(iter(values.values()))


def _ordinal(trace: Trace, site: Any) -> frozenset[str]:
    return frozenset(trace.plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized)


def aligned_log_p(enum_trace: Trace, guide_trace: Trace, reducer: Reducer) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    """Per-factor log-densities of the model with its enumerated sites summed out, aligned.

    Args:
        enum_trace: from :func:`enumerated_trace`.
        guide_trace: the guide's trace (its sites are not summed out).
        reducer: the :class:`Reducer` of this pair of traces.

    Returns:
        ``(aligned, absorbed)``: ``aligned`` maps each site that does not depend on an enumerated
        site to ``reducer.aligned(site)``, and the key ``MARGINAL_PREFIX + "+".join(absorbed)`` to
        the log-marginal of the rest, aligned the same way (its plates are those shared by all the
        summed factors; the sum over the other plates is done). ``absorbed`` names the summed-out
        sites and the sites whose density depends on them. ``sum(reducer.reduce(t))`` over the
        values is :math:`\\log p(x, z)` with the enumerated sites marginalized.
    """
    sites = sample_sites(enum_trace)
    enum_names = [
        name
        for name, site in sites.items()
        if name not in guide_trace.nodes and site["infer"].get("_enumerate_dim") is not None
    ]
    plate_symbols = set(enum_trace.plate_to_symbol.values())
    sum_dims: set[str] = set()
    for name in enum_names:
        sum_dims.update(set(sites[name]["packed"]["log_prob"]._pyro_dims) - plate_symbols)
    aligned: dict[str, Tensor] = {}
    factors: OrderedDict[frozenset[str], list[Tensor]] = OrderedDict()
    scales: dict[str, Any] = {}
    for name, site in sites.items():
        if name in enum_names:
            term = site["packed"]["unscaled_log_prob"]  # the prior of a summed site is never masked
        elif sum_dims.isdisjoint(site["packed"]["log_prob"]._pyro_dims):
            aligned[name] = reducer.aligned(site)
            continue
        else:
            term = packed.scale_and_mask(site["packed"]["unscaled_log_prob"], mask=site["packed"]["mask"])
        factors.setdefault(_ordinal(enum_trace, site), []).append(term)
        scales[name] = site["scale"]
    if not factors:
        return aligned, ()
    absorbed = tuple(scales)
    scale = _common_scale(scales) / reducer.batch_scale
    target = frozenset.intersection(*factors)
    dim_to_size = {
        enum_trace.plate_to_symbol[f.name]: f.size
        for site in sites.values()
        for f in site["cond_indep_stack"]
        if f.vectorized
    }
    marginal = contract_to_tensor(factors, sum_dims, target_ordinal=target, ring=LogRing(dim_to_size=dim_to_size))
    marginal = packed.unpack(marginal, enum_trace.symbol_to_dim) * scale
    extra = marginal.dim() - reducer.rank
    if extra > 0:
        raise ValueError(
            f"the marginal of the enumerated sites {enum_names} has shape {tuple(marginal.shape)}, more dims "
            f"than max_plate_nesting={reducer.rank - 1} allows; pass a larger max_plate_nesting"
        )
    aligned[MARGINAL_PREFIX + "+".join(absorbed)] = marginal.reshape((1,) * -extra + tuple(marginal.shape))
    return aligned, absorbed


def site_share(
    site_log_p: dict[str, Tensor], site_log_q: dict[str, Tensor], site: str, children: list[str]
) -> Tensor | None:
    """A latent site's share of ``log w``: its model factor and its children's, minus its guide
    density, where the marginal of an enumerated group stands for every site it absorbed (counted
    once). ``None`` for a site summed out by enumeration (it has no guide density).

    For per-site k-hat (``kl_gap``) with ``LogWeights.site_log_p`` / ``site_log_q``.
    """
    if site not in site_log_q:
        return None
    group = {
        name: key
        for key in site_log_p
        if key.startswith(MARGINAL_PREFIX)
        for name in key[len(MARGINAL_PREFIX) :].split("+")
    }
    share = -site_log_q[site]
    counted: set[str] = set()
    for name in (site, *children):
        key = group.get(name, name)
        if key not in counted:
            counted.add(key)
            share = share + site_log_p[key]
    return share


def discrete_posterior(
    plated_model: Callable[..., Any],
    guide_trace: Trace,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    max_plate_nesting: int,
    temperature: int = 1,
) -> dict[str, Tensor]:
    """Draw the enumerated sites from their exact posterior given each guide particle.

    Pyro's :func:`~pyro.infer.infer_discrete` (forward filtering, backward sampling) on the model
    with the guide's values replayed: for particle :math:`s`, :math:`d_s \\sim p(d \\mid x, z_s)`
    (``temperature=1``) or its joint mode (``temperature=0``).

    Args:
        plated_model: the model inside the same particle plate as the guide that made ``guide_trace``.
        guide_trace: the guide's trace (``S`` particles).
        max_plate_nesting: plate dims of the model (without the particle plate).

    Returns:
        enumerated site -> its values in the vectorized layout of the trace (particle dim at
        ``-max_plate_nesting - 1``), to be reshaped like any other site (``_Shaper.value``).
    """
    sampler = infer_discrete(
        poutine.replay(plated_model, trace=guide_trace),
        first_available_dim=-max_plate_nesting - 2,
        temperature=temperature,
    )
    with torch.no_grad():
        trace = poutine.trace(sampler).get_trace(*args, **kwargs)
    return {name: trace.nodes[name]["value"] for name in enumerated_sites(trace, guide_trace)}
