"""Enumerated discrete latents: model sites summed out exactly inside :math:`\\log p(x, z)`, and
guide sites summed out as ``TraceEnum_ELBO`` does (:func:`guide_enumerated_weights`, at the end).

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
from dataclasses import dataclass
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


def enumerated_sites(model_trace: Trace, guide_trace: Trace, guide_enumeration: bool = False) -> tuple[str, ...]:
    """The model's sites to sum out: latent, marked ``enumerate="parallel"``, not in the guide.

    ``model_trace`` may be a plain run (enumerated sites drawn from their prior) or an enumerated
    one. Guide-side enumeration is refused, naming the site, unless ``guide_enumeration`` (the
    caller sums the guide's enumerated sites, :func:`guide_enumerated_weights`).

    Raises:
        NotImplementedError: a guide site is marked for enumeration, or a model site for
            ``"sequential"`` enumeration.
    """
    for name, site in sample_sites(guide_trace).items():
        if site["infer"].get("enumerate") and not site["is_observed"] and not guide_enumeration:
            raise NotImplementedError(
                f"Guide site '{name}' is marked for enumeration ({site['infer']['enumerate']!r}); this entry "
                "point sums out enumerated sites of the model only (ELBO, kl_gap and log_evidence also sum "
                "the guide's). Remove the site from the guide (and mark it infer={'enumerate': 'parallel'} "
                "in the model) or drop the mark to sample it."
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


# --------------------------------------------------------------------------------------------
# enumeration in the guide


def guide_marked_sites(guide_trace: Trace) -> tuple[str, ...]:
    """The guide's latent sites marked ``enumerate="parallel"`` (in a run with or without ``poutine.enum``)."""
    return tuple(
        name
        for name, site in sample_sites(guide_trace).items()
        if site["infer"].get("enumerate") == "parallel" and not site["is_observed"]
    )


def without_enumerate_marks(guide_trace: Trace) -> Trace:
    """A shallow copy of a guide's trace (run without ``poutine.enum``) whose sites marked for
    enumeration are unmarked: they were drawn from their guide distribution, and replaying them
    into the model (which copies a guide site's ``infer``) must not mark the model's sites. ``guide_trace``
    itself when no site is marked."""
    marked = set(guide_marked_sites(guide_trace))
    if not marked:
        return guide_trace
    unmarked = Trace(graph_type=guide_trace.graph_type)
    for name, site in guide_trace.nodes.items():
        node: dict[str, Any] = dict(site)
        if name in marked:
            node["infer"] = {k: v for k, v in (site["infer"] or {}).items() if k not in ("enumerate", "expand")}
        unmarked.add_node(name, **node)
    return unmarked


def guide_enumerated_sites(guide_trace: Trace) -> tuple[str, ...]:
    """The guide's latent sites enumerated in parallel (the guide ran under ``poutine.enum``)."""
    return tuple(
        name
        for name, site in sample_sites(guide_trace).items()
        if site["infer"].get("_enumerate_dim") is not None and not site["is_observed"]
    )


@dataclass(frozen=True)
class GuideEnumerated:
    """The weights of a guide whose sites :math:`y` are enumerated (``TraceEnum_ELBO``'s guide
    enumeration), each ``[S, *B]``.

    For every value of :math:`y` the guide draws the other latents :math:`z_y \\sim q(z \\mid y)`.

    Attributes:
        log_p, log_q: the importance weight with the exact sum over :math:`y` inside it,
            :math:`w = \\sum_y q(y) \\frac{p(x, y, z_y)}{q(y)\\,q(z_y \\mid y)}
            = \\sum_y \\frac{p(x, y, z_y)}{q(z_y \\mid y)}`, unbiased for :math:`p(x)`:
            ``log_q`` holds the guide factors that do not depend on :math:`y`, ``log_p`` the
            model's, plus the log of the sum over :math:`y` of every factor that does.
            :math:`q(y)` cancels, so this weight carries no gradient to it.
        elbo_terms: ``TraceEnum_ELBO``'s ELBO, :math:`\\sum_y q(y) \\log \\frac{p(x, y, z_y)}{q(y)
            q(z_y \\mid y)}` per particle: its gradient reaches :math:`q(y)` through the weights.
        site_log_p, site_log_q: the per-site parts of ``log_p`` and ``log_q``; the sum over
            :math:`y` is the ``log_p`` key ``MARGINAL_PREFIX + "+".join(sites it absorbed)``.
    """

    log_p: Tensor
    log_q: Tensor
    elbo_terms: Tensor
    site_log_p: dict[str, Tensor]
    site_log_q: dict[str, Tensor]


def num_enumeration_dims(guide_trace: Trace, max_plate_nesting: int) -> int:
    """How many enumeration dims the guide used left of the particle dim ``-max_plate_nesting - 1``."""
    dims = [
        site["infer"]["_enumerate_dim"]
        for site in sample_sites(guide_trace).values()
        if "_enumerate_dim" in site["infer"]
    ]
    return max((-d for d in dims), default=max_plate_nesting + 1) - (max_plate_nesting + 1)


def guide_enumerated_weights(
    model_sites: dict[str, Any],
    guide_sites: dict[str, Any],
    enumerated: tuple[str, ...],
    reducer: Reducer,
    num_dims: int,
) -> GuideEnumerated:
    """Sum the guide's enumerated sites out: ``TraceEnum_ELBO``'s ELBO and the exact importance
    weight (:class:`GuideEnumerated`).

    Every site's log-density is aligned with ``num_dims`` enumeration dims left of the particle
    dim. A factor *depends* on :math:`y` if it has an enumeration dim; it must then lie in every
    plate of the enumerated sites (as Pyro's plate semantics require). The ELBO weights each
    dependent factor by :math:`q(y)` (the product of the enumerated sites' unscaled probabilities,
    as ``TraceEnum_ELBO``'s Dice factors) and sums over :math:`y`; the importance weight sums the
    dependent factors over the plates the enumerated sites are not in and takes the log-sum-exp
    over :math:`y`, with the subsampling scale applied outside (the sites summed together must
    share it, as in ``TraceEnum_ELBO``).
    """
    axes = tuple(range(num_dims))

    def full(site: Any, role: str, scaled: bool = True) -> Tensor:
        return reducer.aligned(site, scaled=scaled, role=role, extra_dims=num_dims)

    def drop(t: Tensor) -> Tensor:
        return t.reshape(t.shape[num_dims:])

    def depends(t: Tensor) -> bool:
        return any(t.shape[j] > 1 for j in axes)

    log_q_y = sum((full(guide_sites[name], "guide", scaled=False) for name in enumerated), torch.zeros(()))
    probs = log_q_y.exp()
    factors = [(name, "model", site, 1.0) for name, site in model_sites.items()]
    factors += [(name, "guide", site, -1.0) for name, site in guide_sites.items()]
    elbo_terms = []
    site_log_p: dict[str, Tensor] = {}
    site_log_q: dict[str, Tensor] = {}
    dependent: list[tuple[str, Any, float]] = []
    for name, role, site, sign in factors:
        term = sign * full(site, role)
        if not depends(term):
            elbo_terms.append(reducer.reduce(drop(term)))
            (site_log_p if role == "model" else site_log_q)[name] = reducer.reduce(drop(term))
            continue
        for j in range(num_dims + 1, term.dim()):
            if probs.shape[j] > 1 and term.shape[j] == 1:
                raise ValueError(
                    f"{role.capitalize()} site '{name}' depends on the guide's enumerated site(s) "
                    f"{list(enumerated)} but is not in all of their plates; put it in the same pyro.plate."
                )
        elbo_terms.append(reducer.reduce(drop((probs * term).sum(axes, keepdim=True))))
        if not (role == "guide" and name in enumerated):
            dependent.append((name, site, sign))
    scale = _common_scale({name: site["scale"] for name, site, _ in dependent}) if dependent else 1.0
    summed: Tensor | None = None
    for _, site, sign in dependent:
        role = "model" if sign > 0 else "guide"
        term = sign * full({**site, "scale": reducer.batch_scale}, role)  # masked, not scaled
        other_plates = [j for j in range(num_dims + 1, term.dim()) if probs.shape[j] == 1 and term.shape[j] > 1]
        if other_plates:
            term = term.sum(other_plates, keepdim=True)
        summed = term if summed is None else summed + term
    if summed is not None:
        marginal = drop(torch.logsumexp(summed, axes, keepdim=True)) * (scale / reducer.batch_scale)
        site_log_p[MARGINAL_PREFIX + "+".join(name for name, _, _ in dependent)] = reducer.reduce(marginal)
    return GuideEnumerated(
        log_p=reducer.total(site_log_p.values()),
        log_q=reducer.total(site_log_q.values()),
        elbo_terms=reducer.total(elbo_terms),
        site_log_p=site_log_p,
        site_log_q=site_log_q,
    )
