"""Per-particle log importance weights of a guide: the core abstraction.

For particles :math:`z_s \\sim q_\\phi(z \\mid x)`, :math:`s = 1..S`,

.. math::

    \\log w_s = \\log p_\\theta(x, z_s) - \\log q_\\phi(z_s \\mid x).

Particles are drawn vectorized: model and guide run once inside an outer ``pyro.plate`` of size
``S`` placed left of every user plate. With ``num_particles=1`` no such plate is added, so a model
not written for batched latents (``x @ w``) behaves exactly as under Pyro's ``Trace_ELBO``.
Everything else (estimators, diagnostics, training, export) is computed from the
:class:`LogWeights` this module returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyro.poutine as poutine
import torch
from pyro.poutine.trace_struct import Trace
from torch import Tensor

from pyro_elbo._pyro import checks, enum
from pyro_elbo._pyro.analytic_kl import replace_with_kl
from pyro_elbo._pyro.params import has_trainable_params, loss_and_params, params_stopped
from pyro_elbo._pyro.particles import particle_path, vmap_particles
from pyro_elbo._pyro.reduce import Reducer
from pyro_elbo._pyro.score import score_terms
from pyro_elbo._pyro.tracing import (  # re-exported (__all__): the layer's entry points
    PARTICLE_PLATE,
    _tensor,
    batch_frames,
    dependencies,
    guess_max_plate_nesting,
    has_baseline_options,
    particle_plated,
    plate_nesting,
    run_model,
    scored_sites,
    subsampled_plates,
    trace_guide,
    traces,
)
from pyro_elbo._typing import Guide, Model

#: Optional fields of :class:`LogWeights` that estimators may ask for.
OPTIONAL_FIELDS = frozenset({"log_q_stopped", "log_p_stopped_z", "per_site", "analytic_kl"})


@dataclass(frozen=True)
class LogWeights:
    """Log densities of ``S`` guide particles, reduced to ``[S, *B]``.

    Attributes:
        log_p: ``[S, *B]`` :math:`\\log p(x, z_s)` (scale and mask applied).
        log_q: ``[S, *B]`` :math:`\\log q(z_s \\mid x)`.
        log_q_score: ``[S, *B]`` the unscaled log-density of the drawn guide sites that are *not*
            reparameterized (zeros if there are none); its gradient is the score function.
        score_sites: names of the non-reparameterized guide sites.
        observed_score_sites: those of ``score_sites`` the guide observes (``obs=``): their value
            is not drawn, so ``log_w``'s direct gradient of their ``log q`` is exact and an
            objective that needs reparameterized draws can take them.
        batch_plates: names of the plates that enclose every site; ``B`` is their shape.
        batch_scale: subsampling factor ``full_size / subsample_size`` of the batch plates:
            a bound for the full data set is ``batch_scale * bound.sum()``.
        subsampled_plates: subsampled plates that are *not* batch plates. Their scale sits
            inside ``log_w``, which is valid only for estimators linear in ``log_w``.
        log_q_stopped: ``[S, *B]`` ``log q`` re-evaluated at the same ``z_s`` with the guide's
            parameters detached: its gradient is the path derivative only (STL, DReG).
        log_p_stopped_z: ``[S, *B]`` ``log p`` at ``z_s`` detached: its gradient reaches the
            model's parameters only (DReG). ``None`` if not requested or the model has none.
        site_log_p, site_log_q: per-site ``[S, *B]`` contributions (requested with
            ``need={"per_site"}``), used for per-site diagnostics.
        score_terms: non-reparameterized guide site -> ``(log_r, log_q)``, each ``[S, *B, E]``:
            the log-weight restricted to the site's plates (Pyro's Rao-Blackwellization) and the
            site's unscaled log-density, whose gradient is the score function
            (:mod:`pyro_elbo._pyro.score`).
        score_baselines: non-reparameterized guide site -> ``[S, *B, E]`` its learned baseline
            (Pyro's ``nn_baseline`` or ``baseline_value``, in the units of ``log_r``), whose
            squared error to the cost trains it (:mod:`pyro_elbo._pyro.score`).
        baseline_decay: non-reparameterized guide site -> ``baseline_beta`` of the sites that
            ask for Pyro's decaying-average baseline (kept by :class:`~pyro_elbo.ELBO`).
        guide_enumerated: guide sites enumerated in parallel (``config_enumerate`` on the
            guide). ``log_w`` then holds the exact sum over their values (the importance weight
            :math:`\\sum_y p(x, y, z_y) / q(z_y \\mid y)`, :mod:`pyro_elbo._pyro.enum`).
        elbo_terms: ``[S, *B]`` with guide enumeration, ``TraceEnum_ELBO``'s ELBO per particle
            (each enumerated value weighted by its guide probability), which :func:`~pyro_elbo.estimators.elbo`
            uses in place of ``log_w``; ``None`` otherwise.
        log_q_nonreparam: ``[S, *B]`` the scaled part of ``log_q`` from non-reparameterized
            sites (``None`` if there are none). Its direct gradient has expectation zero; the ELBO
            drops it, as Pyro's ``Trace_ELBO`` does.
        log_q_observed: ``[S, *B]`` the scaled ``log q`` of the sites the guide observes
            (``None`` if there are none): a function of the parameters only, the same in every
            particle, so its gradient is direct (no score function, no path derivative).
    """

    log_p: Tensor
    log_q: Tensor
    log_q_score: Tensor
    score_sites: tuple[str, ...] = ()
    observed_score_sites: tuple[str, ...] = ()
    batch_plates: tuple[str, ...] = ()
    batch_scale: float = 1.0
    subsampled_plates: tuple[str, ...] = ()
    log_q_stopped: Tensor | None = None
    log_p_stopped_z: Tensor | None = None
    site_log_p: dict[str, Tensor] = field(default_factory=dict)
    site_log_q: dict[str, Tensor] = field(default_factory=dict)
    score_terms: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    log_q_nonreparam: Tensor | None = None
    log_q_observed: Tensor | None = None
    score_baselines: dict[str, Tensor] = field(default_factory=dict)
    baseline_decay: dict[str, float] = field(default_factory=dict)
    guide_enumerated: tuple[str, ...] = ()
    elbo_terms: Tensor | None = None

    @property
    def log_w(self) -> Tensor:
        """``[S, *B]`` log importance weights ``log_p - log_q``."""
        return self.log_p - self.log_q

    @property
    def num_particles(self) -> int:
        return self.log_p.shape[0]


def log_weights(
    model: Model,
    guide: Guide,
    *args: Any,
    num_particles: int = 1,
    max_plate_nesting: int | None = None,
    vectorize_particles: bool | str = "auto",
    need: frozenset[str] | set[str] | tuple[str, ...] = frozenset(),
    detach_model_params: bool = False,
    **kwargs: Any,
) -> LogWeights:
    """Draw ``num_particles`` particles from the guide and score them under the model.

    Args:
        model: a Pyro model ``p(x, z)``.
        guide: a Pyro guide ``q(z | x)`` with the same latent sites.
        *args: positional arguments of both model and guide.
        num_particles: ``S``, the number of particles (dim 0 of every result).
        max_plate_nesting: the number of plate dims the model uses. Guessed from one run
            (without consuming the caller's random stream) when ``None``.
        vectorize_particles: how particles are drawn (:mod:`pyro_elbo._pyro.particles`):
            ``"auto"`` (default) takes the fastest path the model runs on, decided once per
            model, guide and argument shapes; ``"plate"`` (or ``True``) one outer plate, ``"vmap"``
            ``torch.func.vmap``, ``"sequential"`` (or ``False``) one particle at a time.
        need: optional fields to compute, a subset of ``{"log_q_stopped", "log_p_stopped_z",
            "per_site"}``; ``"analytic_kl"`` replaces each eligible latent's ``log p - log q`` by
            ``-KL(q || p)`` (:mod:`pyro_elbo._pyro.analytic_kl`): ``log_w`` is then an ELBO term,
            not a log importance weight, valid only for estimators linear in ``log_w``.
        detach_model_params: evaluate the model with its parameters detached, so only the guide
            receives gradients (upper-bound objectives).
        **kwargs: keyword arguments of both model and guide.

    Returns:
        A :class:`LogWeights` whose tensors are ``[S, *B]``.

    Raises:
        ValueError: on an invalid model/guide pair (the message names the site), on
            ``num_particles < 1``, or when the model fails under the particle plate.

    Example:
        >>> lw = log_weights(model, guide, data, num_particles=100)  # doctest: +SKIP
        >>> lw.log_w.shape
        torch.Size([100])
    """
    if isinstance(num_particles, bool) or not isinstance(num_particles, int):
        raise TypeError(f"num_particles must be an int, got {num_particles!r}")
    if num_particles < 1:
        raise ValueError(f"num_particles must be >= 1, got {num_particles}")
    unknown = set(need) - OPTIONAL_FIELDS
    if unknown:
        raise ValueError(f"unknown fields in need: {sorted(unknown)}; choose from {sorted(OPTIONAL_FIELDS)}")
    if max_plate_nesting is None:
        max_plate_nesting = guess_max_plate_nesting(model, guide, *args, **kwargs)
    mpn, wanted = max_plate_nesting, frozenset(need)

    def run(path: str, num: int) -> LogWeights:
        if path == "plate" or num == 1:
            return _log_weights_vectorized(model, guide, args, kwargs, num, mpn, wanted, detach_model_params)
        if path == "vmap":
            return _log_weights_vmapped(model, guide, args, kwargs, num, mpn, wanted, detach_model_params)
        return _concat(
            [
                _log_weights_vectorized(model, guide, args, kwargs, 1, mpn, wanted, detach_model_params)
                for _ in range(num)
            ]
        )

    if num_particles == 1:
        return run("plate", 1)
    path = particle_path(vectorize_particles, model, guide, args, kwargs, lambda p, n: _try(run, p, n))
    return run(path, num_particles)


def _try(run: Callable[[str, int], LogWeights], path: str, num: int) -> None:
    """Run ``num`` particles on ``path``, values and gradients, without touching any ``.grad``."""
    lw, params = loss_and_params(lambda: run(path, num))
    leaves = [p for p in params.values() if p.requires_grad]
    if lw.log_w.requires_grad and leaves:
        torch.autograd.grad(lw.log_w.sum(), leaves, allow_unused=True)


def _log_weights_vmapped(
    model: Model,
    guide: Guide,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    num_particles: int,
    max_plate_nesting: int,
    need: frozenset[str],
    detach_model_params: bool,
) -> LogWeights:
    """One single-particle evaluation, vectorized over particles by ``torch.func.vmap``."""
    first: list[LogWeights] = []

    def one() -> dict[str, Any]:
        lw = _log_weights_vectorized(model, guide, args, kwargs, 1, max_plate_nesting, need, detach_model_params)
        first.append(lw)
        return {f: getattr(lw, f) for f in _TENSOR_FIELDS if getattr(lw, f) is not None}

    out = vmap_particles(one, num_particles)
    squeezed = torch.utils._pytree.tree_map(lambda t: t[:, 0], out)
    return dataclasses.replace(first[0], **squeezed)


#: the fields of LogWeights that hold per-particle tensors (alone, or in a dict)
_TENSOR_FIELDS = (
    "log_p",
    "log_q",
    "log_q_score",
    "log_q_stopped",
    "log_p_stopped_z",
    "site_log_p",
    "site_log_q",
    "score_terms",
    "log_q_nonreparam",
    "score_baselines",
    "elbo_terms",
)


def _log_weights_vectorized(
    model: Model,
    guide: Guide,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    num_particles: int,
    max_plate_nesting: int,
    need: frozenset[str],
    detach_model_params: bool,
) -> LogWeights:
    model_trace, guide_trace = traces(model, guide, args, kwargs, num_particles, max_plate_nesting, detach_model_params)
    guide_enumerated = enum.guide_enumerated_sites(guide_trace)
    enumerated = enum.enumerated_sites(model_trace, guide_trace, guide_enumeration=bool(guide_enumerated))
    checks.check_model_guide(
        enum.without_sites(model_trace, enumerated),
        guide_trace,
        max_plate_nesting,
        num_particles > 1 and PARTICLE_PLATE,
        guide_enumerated=guide_enumerated,
    )
    if guide_enumerated:
        return _guide_enumerated_log_weights(
            model_trace, guide_trace, guide_enumerated, enumerated, max_plate_nesting, num_particles, need
        )
    plated_model = particle_plated(model, num_particles, -max_plate_nesting - 1)
    if enumerated:  # sum them out: log p(x, z) of the marginal model, as in TraceEnum_ELBO
        with params_stopped() if detach_model_params else contextlib.nullcontext():
            model_trace = enum.enumerated_trace(plated_model, guide_trace, args, kwargs, max_plate_nesting)
    batch = batch_frames(model_trace, guide_trace)
    batch_scale = math.prod(frame.full_size / frame.size for frame in batch)
    batch_names = {frame.name for frame in batch}
    subsampled = tuple(sorted(set(subsampled_plates(model_trace, guide_trace)) - batch_names))
    reducer = Reducer(max_plate_nesting, num_particles, batch, batch_scale)
    model_sites = dict(scored_sites(model_trace, named=True))
    guide_sites = dict(scored_sites(guide_trace, named=True))
    if enumerated:
        model_aligned, _ = enum.aligned_log_p(model_trace, guide_trace, reducer)
    else:
        model_aligned = {name: reducer.aligned(site) for name, site in model_sites.items()}
    guide_aligned = {name: reducer.aligned(site, role="guide") for name, site in guide_sites.items()}
    if "analytic_kl" in need:
        replace_with_kl(model_sites, guide_sites, model_aligned, guide_aligned, reducer)
    site_log_p = {name: reducer.reduce(t) for name, t in model_aligned.items()}
    site_log_q = {name: reducer.reduce(t) for name, t in guide_aligned.items()}
    score_sites = tuple(name for name, site in guide_sites.items() if not site["fn"].has_rsample)
    if score_sites and has_baseline_options(guide_trace):
        reducer.provenance = dependencies(model, guide, reducer.provenance)
    log_p = reducer.total(site_log_p.values())
    log_q = reducer.total(site_log_q.values())
    terms, baselines = score_terms(
        model_sites, guide_sites, model_aligned, guide_aligned, score_sites, reducer, PARTICLE_PLATE
    )
    observed = tuple(n for n, site in guide_sites.items() if site["is_observed"])  # not drawn: no score
    log_q_score = reducer.total(
        reducer.reduce(reducer.aligned(guide_sites[n], scaled=False)) for n in score_sites if n not in observed
    )

    log_q_stopped = None
    if "log_q_stopped" in need:
        with params_stopped():
            stopped, _ = trace_guide(guide, args, kwargs, num_particles, -max_plate_nesting - 1, replay=guide_trace)
        # a site the guide observes has no path derivative: its log q keeps the parameters' gradient
        log_q_stopped = reducer.total(
            site_log_q[name] if site["is_observed"] else reducer(site)
            for name, site in scored_sites(stopped, named=True)
        )

    log_p_stopped_z = None
    if "log_p_stopped_z" in need and not detach_model_params and has_trainable_params(model_trace):
        detached = Trace()
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample":
                detached.add_node(name, **{**site, "value": _tensor(site["value"]).detach()})
        if enumerated:
            replayed = enum.enumerated_trace(plated_model, detached, args, kwargs, max_plate_nesting)
            aligned, _ = enum.aligned_log_p(replayed, detached, reducer)
            log_p_stopped_z = reducer.total(reducer.reduce(t) for t in aligned.values())
        else:
            replayed = poutine.trace(poutine.replay(plated_model, trace=detached)).get_trace(*args, **kwargs)
            log_p_stopped_z = reducer.total(reducer(site) for site in scored_sites(replayed))

    per_site = "per_site" in need
    return LogWeights(
        log_p=log_p,
        log_q=log_q,
        log_q_score=log_q_score,
        score_sites=score_sites,
        observed_score_sites=tuple(n for n in score_sites if n in observed),
        batch_plates=tuple(frame.name for frame in batch),
        batch_scale=batch_scale,
        subsampled_plates=subsampled,
        log_q_stopped=log_q_stopped,
        log_p_stopped_z=log_p_stopped_z,
        site_log_p=site_log_p if per_site else {},
        site_log_q=site_log_q if per_site else {},
        score_terms=terms,
        log_q_nonreparam=reducer.total(site_log_q[n] for n in score_sites) if score_sites else None,
        log_q_observed=reducer.total(site_log_q[n] for n in observed) if observed else None,
        score_baselines=baselines.learned,
        baseline_decay=baselines.decay,
    )


def _guide_enumerated_log_weights(
    model_trace: Trace,
    guide_trace: Trace,
    guide_enumerated: tuple[str, ...],
    model_enumerated: tuple[str, ...],
    max_plate_nesting: int,
    num_particles: int,
    need: frozenset[str],
) -> LogWeights:
    """:class:`LogWeights` of a guide that enumerates ``guide_enumerated``: the exact sum over their
    values inside the importance weight, and ``TraceEnum_ELBO``'s ELBO as ``elbo_terms``
    (:func:`~pyro_elbo._pyro.enum.guide_enumerated_weights`)."""
    if model_enumerated:
        raise NotImplementedError(
            f"The guide enumerates {list(guide_enumerated)} and the model enumerates {list(model_enumerated)}; "
            "pyro_elbo sums out one side at a time. Sample one of them (drop its enumerate flag) or use "
            "pyro.infer.TraceEnum_ELBO."
        )
    model_sites = dict(scored_sites(model_trace, named=True))
    guide_sites = dict(scored_sites(guide_trace, named=True))
    sampled = [n for n, site in guide_sites.items() if not site["fn"].has_rsample and n not in guide_enumerated]
    if sampled:
        raise NotImplementedError(
            f"The guide enumerates {list(guide_enumerated)} and samples the discrete site(s) {sampled}, "
            "whose score-function terms would need the enumerated weights; enumerate them too "
            "(config_enumerate) or use pyro.infer.TraceEnum_ELBO."
        )
    batch = batch_frames(model_trace, guide_trace)
    batch_scale = math.prod(frame.full_size / frame.size for frame in batch)
    subsampled = tuple(sorted(set(subsampled_plates(model_trace, guide_trace)) - {frame.name for frame in batch}))
    reducer = Reducer(max_plate_nesting, num_particles, batch, batch_scale)
    num_dims = enum.num_enumeration_dims(guide_trace, max_plate_nesting)
    summed = enum.guide_enumerated_weights(model_sites, guide_sites, guide_enumerated, reducer, num_dims)
    per_site = "per_site" in need
    return LogWeights(
        log_p=summed.log_p,
        log_q=summed.log_q,
        log_q_score=reducer.total(()),
        batch_plates=tuple(frame.name for frame in batch),
        batch_scale=batch_scale,
        subsampled_plates=subsampled,
        site_log_p=summed.site_log_p if per_site else {},
        site_log_q=summed.site_log_q if per_site else {},
        guide_enumerated=guide_enumerated,
        elbo_terms=summed.elbo_terms,
    )


def _concat(parts: list[LogWeights]) -> LogWeights:
    def cat(values: list[Tensor | None]) -> Tensor | None:
        return None if any(v is None for v in values) else torch.cat(values, 0)  # type: ignore[arg-type]

    first = parts[0]
    return LogWeights(
        log_p=torch.cat([p.log_p for p in parts]),
        log_q=torch.cat([p.log_q for p in parts]),
        log_q_score=torch.cat([p.log_q_score for p in parts]),
        score_sites=first.score_sites,
        observed_score_sites=first.observed_score_sites,
        batch_plates=first.batch_plates,
        batch_scale=first.batch_scale,
        subsampled_plates=first.subsampled_plates,
        log_q_stopped=cat([p.log_q_stopped for p in parts]),
        log_p_stopped_z=cat([p.log_p_stopped_z for p in parts]),
        site_log_p={k: torch.cat([p.site_log_p[k] for p in parts]) for k in first.site_log_p},
        site_log_q={k: torch.cat([p.site_log_q[k] for p in parts]) for k in first.site_log_q},
        log_q_nonreparam=cat([p.log_q_nonreparam for p in parts]),
        log_q_observed=cat([p.log_q_observed for p in parts]),
        score_terms={
            k: (torch.cat([p.score_terms[k][0] for p in parts]), torch.cat([p.score_terms[k][1] for p in parts]))
            for k in first.score_terms
        },
        score_baselines={k: torch.cat([p.score_baselines[k] for p in parts]) for k in first.score_baselines},
        baseline_decay=first.baseline_decay,
        guide_enumerated=first.guide_enumerated,
        elbo_terms=cat([p.elbo_terms for p in parts]),
    )


__all__ = [
    "OPTIONAL_FIELDS",
    "PARTICLE_PLATE",
    "LogWeights",
    "batch_frames",
    "guess_max_plate_nesting",
    "log_weights",
    "particle_plated",
    "plate_nesting",
    "run_model",
    "scored_sites",
    "subsampled_plates",
    "trace_guide",
    "traces",
]
