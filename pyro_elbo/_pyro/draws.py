"""Guide draws for export: every site in its natural shape, particles on dim 0."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from torch import Tensor

from pyro_elbo._pyro import checks, enum
from pyro_elbo._pyro.cache import ProgramCache
from pyro_elbo._pyro.log_weights import (
    PARTICLE_PLATE,
    guess_max_plate_nesting,
    particle_plated,
    scored_sites,
    subsampled_plates,
    trace_guide,
    traces,
)
from pyro_elbo._pyro.particles import (
    ParticlePathWarning,
    argument_signature,
    normalize,
    particle_path,
    vmap_particles,
)
from pyro_elbo._pyro.reduce import Reducer
from pyro_elbo._random import forked_rng
from pyro_elbo._typing import Guide, Model


@dataclass(frozen=True)
class Draws:
    """Guide draws and what the model says about them, with particles on dim 0 and every site in
    its own natural shape (as in an unvectorized run of the model).

    Attributes:
        latent: latent site -> ``[S, *shape]`` values drawn from the guide.
        deterministic: ``pyro.deterministic`` site -> ``[S, *shape]``.
        log_likelihood: observed site -> ``[S, *batch_shape]`` pointwise log-likelihood.
        predictive: observed site -> ``[S, *shape]`` draws from the model given each particle.
        observed: observed site -> its data.
        log_p, log_q: ``[S]`` joint log-densities of each draw.
        no_replicate: observed site -> why the model cannot draw a replicate of its data (its
            distribution's event shape is not the data's), for the sites left out of ``predictive``.
    """

    latent: dict[str, Tensor]
    deterministic: dict[str, Tensor]
    log_likelihood: dict[str, Tensor]
    predictive: dict[str, Tensor]
    observed: dict[str, Tensor]
    log_p: Tensor
    log_q: Tensor
    no_replicate: dict[str, str] = dataclasses.field(default_factory=dict)


def posterior_draws(
    model: Model,
    guide: Guide,
    *args: Any,
    num_samples: int,
    max_plate_nesting: int | None = None,
    predictive: bool = True,
    vectorize_particles: bool | str = "auto",
    **kwargs: Any,
) -> Draws:
    """Draw ``num_samples`` particles from the guide without gradients, on the same particle path
    (plate, vmap or one at a time) as :func:`~pyro_elbo.weights.log_weights` takes for the model.

    Raises:
        ValueError: if a plate is subsampled (export the full data set).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if max_plate_nesting is None:
        max_plate_nesting = guess_max_plate_nesting(model, guide, *args, **kwargs)
    with torch.no_grad(), forked_rng(), poutine.block():
        guide_trace, inner_model_trace = trace_guide(guide, args, kwargs)
        reference_trace = inner_model_trace or poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    mpn = max_plate_nesting

    def run(path: str, num: int) -> Draws:
        if path == "plate" or num == 1:
            return _draws_plated(model, guide, args, kwargs, num, mpn, predictive, reference_trace)
        if path == "vmap":
            first: list[Draws] = []

            def one() -> dict[str, Any]:
                draws = _draws_plated(model, guide, args, kwargs, 1, mpn, predictive, reference_trace)
                first.append(draws)
                return {f: getattr(draws, f) for f in _PER_DRAW_FIELDS}

            out = vmap_particles(one, num)
            return dataclasses.replace(first[0], **torch.utils._pytree.tree_map(lambda t: t[:, 0], out))
        parts = [_draws_plated(model, guide, args, kwargs, 1, mpn, predictive, reference_trace) for _ in range(num)]
        stacked = {
            f: torch.utils._pytree.tree_map(lambda *ts: torch.cat(ts), *[getattr(p, f) for p in parts])
            for f in _PER_DRAW_FIELDS
        }
        return dataclasses.replace(parts[0], **stacked)

    with torch.no_grad():
        if num_samples == 1:
            return run("plate", 1)
        path = particle_path(vectorize_particles, model, guide, args, kwargs, lambda p, n: _discard(run(p, n)))
        if path == "sequential" or normalize(vectorize_particles) != "auto":
            return run(path, num_samples)
        signature = argument_signature(args, kwargs)
        sequential = _SEQUENTIAL.get(model, guide)
        if sequential is not None and signature in sequential:
            return run("sequential", num_samples)
        try:
            return run(path, num_samples)
        except Exception as error:  # noqa: BLE001 - the program's own error recurs one particle at a time
            draws = run("sequential", num_samples)
            if sequential is None:
                sequential = set()
                _SEQUENTIAL.put(model, guide, sequential)
            sequential.add(signature)
            warnings.warn(
                f"pyro_elbo: the export's draws failed on the {path} path ({type(error).__name__}: "
                f"{str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}), so they are drawn one "
                "particle at a time. Pass vectorize_particles='sequential' to choose that path yourself.",
                ParticlePathWarning,
                stacklevel=4,
            )
            return draws


#: model/guide pairs whose export draws failed on the path their objectives take -> argument signatures
_SEQUENTIAL = ProgramCache()


def _discard(_: Any) -> None:
    return None


_PER_DRAW_FIELDS = ("latent", "deterministic", "log_likelihood", "predictive", "log_p", "log_q")


def _draws_plated(
    model: Model,
    guide: Guide,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    num_samples: int,
    max_plate_nesting: int,
    predictive: bool,
    reference_trace: Trace,
) -> Draws:
    """``num_samples`` draws in one pass inside the particle plate."""
    model_trace, guide_trace = traces(
        model, guide, args, kwargs, num_samples, max_plate_nesting, False, sample_guide_enumerated=True
    )
    enumerated = enum.enumerated_sites(model_trace, guide_trace)
    particle_plate = num_samples > 1 and PARTICLE_PLATE
    checks.check_model_guide(
        enum.without_sites(model_trace, enumerated), guide_trace, max_plate_nesting, particle_plate
    )
    for frame in subsampled_plates(model_trace, guide_trace).values():
        raise ValueError(
            f"plate '{frame.name}' is subsampled ({frame.size} of {frame.full_size}); export "
            "draws with the full data set (no subsample_size)."
        )
    reducer = Reducer(max_plate_nesting, num_samples, (), 1.0)
    shaped = _Shaper(reference_trace, num_samples)
    marginal_log_lik: dict[str, Tensor] = {}
    left_out: set[str] = set()
    no_predictive: set[str] = set()
    if enumerated:  # discrete sites: exact posterior draws; log p and log-likelihood marginal over them
        plated_model = particle_plated(model, num_samples, -max_plate_nesting - 1)
        model_trace, log_p, marginal_log_lik, left_out, no_predictive = _enumerated_parts(
            plated_model, guide_trace, args, kwargs, max_plate_nesting, reducer, shaped, model_trace
        )
    else:
        log_p = reducer.total(reducer(site) for site in scored_sites(model_trace))
    log_q = reducer.total(reducer(site) for site in scored_sites(guide_trace))
    latent, deterministic, log_lik, observed = {}, {}, dict(marginal_log_lik), {}
    for name, site in scored_sites(model_trace, named=True):
        kind = site_kind(site)
        if kind == "deterministic":
            deterministic[name] = shaped.value(name, site["value"])
        elif kind == "factor":
            continue  # in log_p, not an observation
        elif kind == "observed":
            observed[name] = reference_trace.nodes[name]["value"]
            if name not in log_lik and name not in left_out:
                log_lik[name] = shaped.batch(name, site["fn"].log_prob(site["value"]))
        elif name not in left_out:
            latent[name] = shaped.value(name, site["value"])
    pred: dict[str, Tensor] = {}
    no_replicate: dict[str, str] = {}
    if predictive and observed:
        resample = _ResampleObserved()
        plated = particle_plated(resample(model), num_samples, -max_plate_nesting - 1)
        latent_only = Trace()
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample" and name not in observed:
                latent_only.add_node(name, **site)
        pred_trace = poutine.trace(poutine.replay(plated, trace=latent_only)).get_trace(*args, **kwargs)
        no_replicate = dict(resample.unmatched)
        pred = {
            name: shaped.value(name, pred_trace.nodes[name]["value"])
            for name in observed
            if name not in no_predictive and name not in resample.unmatched
        }
    return Draws(latent, deterministic, log_lik, pred, observed, log_p, log_q, no_replicate)  # type: ignore[arg-type]


def site_kind(site: Any) -> str:
    """What a scored model site is, for export: ``"deterministic"`` (``pyro.deterministic``),
    ``"factor"`` (``pyro.factor``: a term of log p, no data), ``"reparam"`` (a site that
    ``poutine.reparam`` rewrote: Pyro marks it observed with a ``Delta`` at the value computed
    from its auxiliary sites, but it is a latent of the original model), ``"observed"`` or
    ``"latent"``."""
    if site["infer"].get("_deterministic"):
        return "deterministic"
    if not site["is_observed"]:
        return "latent"
    fn = site["fn"]
    while hasattr(fn, "base_dist"):  # Independent, MaskedDistribution, ExpandedDistribution
        fn = fn.base_dist
    if isinstance(fn, dist.Unit):
        return "factor"
    if isinstance(fn, dist.Delta):
        return "reparam"
    return "observed"


def _enumerated_parts(
    plated_model: Model,
    guide_trace: Trace,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    max_plate_nesting: int,
    reducer: Reducer,
    shaped: _Shaper,
    plain_trace: Trace,
) -> tuple[Trace, Tensor, dict[str, Tensor], set[str], set[str]]:
    """For a model with enumerated discrete sites: its trace with those sites drawn from their exact
    posterior given each particle (``infer_discrete``), the ``[S]`` log-density with them summed
    out, and each observed site's pointwise log-likelihood marginal over them (what ``az.loo``
    needs). An observed site summed together with others (an HMM's chain) gets the group's
    log-likelihood under the first one's name, per entry of the plates the group shares.

    Where Pyro's ``infer_discrete`` fails on the model (it raises ``KeyError`` on some models
    that sample continuous latents inside ``pyro.markov``, e.g. the Cormack-Jolly-Seber models
    of Pyro's capture-recapture example), warns naming the error and returns ``plain_trace``
    (``plated_model`` run with the discrete sites from their prior) with the names to leave out
    of the export: the discrete sites, and the observed sites of the group but the first (their
    log-likelihood is in the first one's; their data is still exported), and the observed sites
    that depend on the discrete ones, whose posterior predictive cannot be drawn.

    Returns:
        ``(model_trace, log_p, log_lik, left_out, no_predictive)``.
    """
    enum_trace = enum.enumerated_trace(plated_model, guide_trace, args, kwargs, max_plate_nesting)
    aligned, absorbed = enum.aligned_log_p(enum_trace, guide_trace, reducer)
    log_p = reducer.total(reducer.reduce(t) for t in aligned.values())
    left_out: set[str] = set()
    try:
        discrete = enum.discrete_posterior(plated_model, guide_trace, args, kwargs, max_plate_nesting)
    except Exception as error:  # Pyro's infer_discrete only: the model itself ran above
        names = enum.enumerated_sites(plain_trace, guide_trace)
        warnings.warn(
            f"Pyro's infer_discrete failed on this model ({type(error).__name__}: {error}), so the discrete "
            f"sites {list(names)} are not exported as posterior draws; every other site is, with the observed "
            "sites' log-likelihood marginal over the discrete ones (in log_likelihood under the first observed "
            "site of each group that depends on them).",
            UserWarning,
            stacklevel=5,
        )
        model_trace = plain_trace
        left_out.update(names)
    else:
        completed = guide_trace.copy()
        for name, value in discrete.items():
            completed.add_node(name, name=name, type="sample", value=value, is_observed=False, infer={}, fn=None)
        model_trace = poutine.trace(poutine.replay(plated_model, trace=completed)).get_trace(*args, **kwargs)
    observed = [n for n in absorbed if model_trace.nodes[n]["is_observed"]]
    no_predictive = set(observed) if left_out else set()
    if left_out:
        left_out.update(observed[1:])
    marginal = next((t for key, t in aligned.items() if key.startswith(enum.MARGINAL_PREFIX)), None)
    log_lik: dict[str, Tensor] = {}
    if observed and marginal is not None:
        name = observed[0]
        try:
            log_lik[name] = shaped.batch(name, marginal)
        except ValueError:  # the group spans the site's plates only in part: one value per draw
            log_lik[name] = reducer.reduce(marginal)
    return model_trace, log_p, log_lik, left_out, no_predictive


class _ResampleObserved(Messenger):
    """Like ``poutine.uncondition`` but only for observed data: leaves ``pyro.deterministic``,
    ``pyro.factor`` and ``poutine.reparam``'s rewritten sites alone.

    A draw replicates the data only where the distribution's shape covers the data's. Where it
    does not (Pyro's ``MissingDataDiscreteHMM``, whose event shape ``(1, K)`` stands for a sequence
    of any length, draws one step per sequence) no draw is a replicate: the site stays observed
    and ``unmatched`` says why (site -> reason). (A distribution that broadcasts against its data
    in the batch dims is refused before, by :func:`~pyro_elbo._pyro.checks.check_model_guide`.)"""

    def __init__(self) -> None:
        super().__init__()
        self.unmatched: dict[str, str] = {}

    def _pyro_sample(self, msg: Any) -> None:
        if not (msg["is_observed"] and site_kind(msg) == "observed"):
            return
        fn, data = msg["fn"], msg["value"]
        if isinstance(data, Tensor):
            shape = tuple(fn.batch_shape) + tuple(fn.event_shape)
            try:
                covers = tuple(torch.broadcast_shapes(shape, tuple(data.shape))) == shape
            except RuntimeError:
                covers = False
            if not covers:
                base = fn
                while hasattr(base, "base_dist"):  # Independent, MaskedDistribution, ExpandedDistribution
                    base = base.base_dist
                self.unmatched[msg["name"]] = (
                    f"its distribution ({type(base).__name__}) draws events of shape {tuple(fn.event_shape)}, "
                    f"but its data has shape {tuple(data.shape)}"
                )
                return
        msg["is_observed"] = False
        msg["value"] = None
        msg["done"] = False


class ParticleLayoutError(ValueError):
    """A site's value with particles is not laid out as the particle plate puts it."""


class _Shaper:
    """Reshapes vectorized site values ``[S, 1, ..., *shape]`` to ``[S, *shape]``.

    The particle plate sits left of every plate of the model (dim ``-max_plate_nesting - 1``), so
    a value with particles is the site's own value (its shape in a run without particles, from
    ``reference``) behind the particle dim and size-1 dims: ``[S, 1, ..., 1, *shape]`` (the
    particle dim may also take the place of leading size-1 dims of ``shape``), or the value
    without a particle dim (``[1, ..., 1, *shape]``, the same for every particle, repeated).
    Anything else (a model not written for batched latents whose value mixes the particles with
    its own dims) is a :class:`ParticleLayoutError`, not a guess from the number of elements.
    """

    def __init__(self, reference: Trace, num_samples: int) -> None:
        self.reference = reference
        self.num = num_samples

    def value(self, name: str, value: Tensor) -> Tensor:
        reference: Any = self.reference.nodes[name]["value"]
        return self._reshape(name, value, tuple(reference.shape))

    def batch(self, name: str, value: Tensor) -> Tensor:
        fn: Any = self.reference.nodes[name]["fn"]
        shape = tuple(fn.batch_shape)
        return self._reshape(name, value, shape)

    def _reshape(self, name: str, value: Tensor, shape: tuple[int, ...]) -> Tensor:
        target = (self.num, *shape)
        have = tuple(value.shape)
        core = shape
        while core and core[0] == 1:
            core = core[1:]
        lead = have[: len(have) - len(core)]
        if have[len(lead) :] == core:
            if all(d == 1 for d in lead):  # does not depend on the particles: repeat it
                return value.reshape(shape).expand(target).clone()
            if lead[0] == self.num and all(d == 1 for d in lead[1:]):
                return value.reshape(target)
        raise ParticleLayoutError(
            f"site '{name}' has shape {have} with {self.num} particles but {shape} without, which is not "
            f"{shape} behind a particle dim of size {self.num}; draw the particles one at a time "
            "(vectorize_particles='sequential')"
        )
