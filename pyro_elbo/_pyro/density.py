"""Differentiable log densities of a model and its guide over a batch of chains, in the guide's
unconstrained space; simulating ``(z*, x*)`` from a model.

This is the Pyro side of :mod:`pyro_elbo.ais` and :mod:`pyro_elbo.evidence`: they see only
dicts of unconstrained tensors and ``[C, *B]`` log densities. For chains ``c = 1..C`` the model
and guide run once inside an outer ``pyro.plate`` of size ``C`` left of every user plate, and
every latent site ``z = T(u)`` with ``T = biject_to(support)`` of the guide's distribution, so

.. math::

    \\log \\tilde q(u) = \\log q(T(u)) + \\log |\\det J_T(u)|, \\qquad
    \\log \\tilde p(x, u) = \\log p(x, T(u)) + \\log |\\det J_T(u)|.

Log densities are summed over every dim except the chains (dim 0) and the *batch plates*, the
plates that enclose every site; ``B`` is their shape (one entry per data point of an amortized
model), so each data point's chains are independent and are annealed on their own.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.trace_struct import Trace
from torch import Tensor
from torch.distributions import biject_to

from pyro_elbo._pyro.capture import validation_off
from pyro_elbo._pyro.tracing import batch_frames, plate_nesting, scored_sites
from pyro_elbo._random import forked_rng
from pyro_elbo._typing import Guide, Model

CHAIN_PLATE = "_pyro_elbo_chains"


class ChainPlateError(ValueError):
    """The model or guide cannot broadcast over AIS chains (it was not written for batched latents)."""


def _chained(fn: Any, num_chains: int, dim: int) -> Any:
    """``fn`` inside the chain plate; a shape failure there is said in AIS's terms."""

    def plated(*args: Any, **kwargs: Any) -> Any:
        with pyro.plate(CHAIN_PLATE, num_chains, dim=dim):
            try:
                return fn(*args, **kwargs)
            except (RuntimeError, IndexError) as error:
                if num_chains == 1:
                    raise
                raise ChainPlateError(
                    f"AIS and BDMC run their {num_chains} chains in one vectorized pass (pyro.plate "
                    f"'{CHAIN_PLATE}' at dim {dim}), and the model or guide failed under it: "
                    f"{type(error).__name__}: {str(error).splitlines()[0]}. A model not written for batched "
                    "latents (e.g. `x @ w` with a vector latent `w`, or an nn.Linear whose weight is a "
                    "PyroSample) cannot broadcast over chains; AIS and BDMC do not run chains through "
                    "torch.func.vmap or one at a time yet (log_evidence(method='iwae') and kl_gap without "
                    "bdmc do)."
                ) from error

    return plated


@dataclass(frozen=True)
class Observed:
    """What the model observes per data point: ``dims`` observed scalars, ``discrete`` if every
    observed site has a discrete support (then ``-log p(x) / (dims log 2)`` is bits per dim)."""

    dims: int
    discrete: bool


class JointDensity:
    """``log q(z)`` and ``log p(x, z)`` of ``C`` chains per data point, as functions of the
    unconstrained latents ``u``; built from one run of guide and model on ``*args, **kwargs``.

    Attributes:
        batch_plates: names of the plates enclosing every site; ``batch_shape`` is their shape.
        sites: latent site names, in guide order.
        observed: per-data-point size and kind of the observations.
    """

    def __init__(
        self, model: Model, guide: Guide, args: tuple[Any, ...], kwargs: dict[str, Any], num_chains: int
    ) -> None:
        self.model, self.guide, self.args, self.kwargs = model, guide, args, kwargs
        self.num_chains = num_chains
        with forked_rng(), torch.no_grad(), poutine.block():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        self.rank = plate_nesting(guide_trace, model_trace) + 1
        guide_sites = dict(scored_sites(guide_trace, named=True))
        self.guide_sites = list(guide_sites)
        # the variables AIS moves: guide sites with a density (Delta sites are functions of them,
        # as the latents of AutoNormal are of its auxiliary ``*_unconstrained`` sites)
        self.latents = [name for name, site in guide_sites.items() if not _is_delta(site["fn"])]
        self.deltas = [name for name in guide_sites if name not in self.latents]
        self.model_latents = [name for name, site in scored_sites(model_trace, named=True) if not site["is_observed"]]
        model_sites: dict[str, Any] = dict(model_trace.nodes)
        self.supports = {name: model_sites[name]["fn"].support for name in self.model_latents}
        #: the first :meth:`log_densities` call ran with Pyro's checks on (data, supports); later
        #: calls (AIS proposals) run without them: a proposal that overflows gets a non-finite
        #: density and is rejected, instead of a distribution refusing its non-finite parameter
        self.checked = False
        for name, site in guide_sites.items():
            if name not in model_trace.nodes and not (name in self.latents and site["infer"].get("is_auxiliary")):
                raise ValueError(f"guide site '{name}' is not a sample site of the model")
        if self.deltas and len(self.latents) == 0:
            raise ValueError(
                f"guide site '{self.deltas[0]}' is a point mass (Delta) and the guide has no auxiliary site "
                "with a density: AIS and BDMC need a guide density (e.g. AutoNormal, not AutoDelta)"
            )
        for name, site in scored_sites(model_trace, named=True):
            if not site["is_observed"] and name not in guide_trace.nodes:
                raise ValueError(
                    f"model latent site '{name}' has no guide site (enumerated or auxiliary?): AIS and "
                    "BDMC move every latent, so each needs a continuous guide site"
                )
        frames = _common_frames(model_trace, guide_trace)
        for frame in {
            f.name: f
            for t in (model_trace, guide_trace)
            for _, s in scored_sites(t, named=True)
            for f in s["cond_indep_stack"]
        }.values():
            if frame.full_size not in (None, frame.size):
                raise ValueError(
                    f"plate '{frame.name}' is subsampled ({frame.size} of {frame.full_size}); score "
                    "the data without subsample_size (pass batches through a DataLoader instead)"
                )
        self.batch_plates = tuple(frame.name for frame in frames)
        self._batch_dims = {self.rank + frame.dim: frame.size for frame in frames}  # positive dims
        self.batch_shape = tuple(self._batch_dims[d] for d in sorted(self._batch_dims))
        num_points = math.prod(self.batch_shape)
        obs = [site for _, site in scored_sites(model_trace, named=True) if site["is_observed"]]
        dims = sum(site["value"].numel() for site in obs)
        self.observed = Observed(
            dims // max(num_points, 1), bool(obs) and all(s["fn"].support.is_discrete for s in obs)
        )
        self.transforms: dict[str, Any] = {}

    # ------------------------------------------------------------------ shapes
    def reduce(self, tensor: Tensor, event_dim: int = 0) -> Tensor:
        """Sum a ``[C, *rank dims, *event]`` tensor to ``[C, *B]``."""
        if event_dim:
            tensor = tensor.sum(tuple(range(-event_dim, 0)))
        extra = tensor.dim() - self.rank
        if extra > 0:
            raise ValueError(f"a log density of shape {tuple(tensor.shape)} has more dims than its plates")
        tensor = tensor.reshape((1,) * -extra + tuple(tensor.shape))
        keep = {0, *self._batch_dims}
        dims = [d for d in range(self.rank) if d not in keep and tensor.shape[d] != 1]
        if dims:
            tensor = tensor.sum(dims, keepdim=True)
        shape = [tensor.shape[0]] + [self._batch_dims.get(d, 1) for d in range(1, self.rank)]
        out = [tensor.shape[0], *self.batch_shape]
        return tensor.expand(shape).reshape(out)

    def broadcast(self, tensor: Tensor, like: Tensor) -> Tensor:
        """A ``[C or 1, *B]`` tensor shaped to broadcast against a site tensor ``like``."""
        shape = [tensor.shape[0]] + [self._batch_dims.get(d, 1) for d in range(1, self.rank)]
        return tensor.reshape(shape + [1] * (like.dim() - self.rank))

    def event_dim(self, value: Tensor) -> int:
        return value.dim() - self.rank

    # ------------------------------------------------------------------ densities
    def _run_guide(self, values: dict[str, Tensor] | None) -> Trace:
        guide = _chained(self.guide, self.num_chains, -self.rank)
        if values is not None:
            guide = poutine.condition(guide, data=values)
        trace: Trace = poutine.trace(guide).get_trace(*self.args, **self.kwargs)
        return trace

    def sample(self) -> dict[str, Tensor]:
        """Draw ``C`` particles from the guide; return their unconstrained values ``u``."""
        with torch.no_grad():
            trace = self._run_guide(None)
        out = {}
        for name in self.latents:
            site: Any = trace.nodes[name]
            if site["fn"].support.is_discrete:
                raise ValueError(
                    f"latent site '{name}' is discrete: AIS moves need continuous latents "
                    "(use method='iwae', or enumerate the site out of the model)"
                )
            self.transforms[name] = biject_to(site["fn"].support)
            out[name] = self.transforms[name].inv(site["value"]).detach()
        return out

    def unconstrain(self, latents: dict[str, Tensor]) -> dict[str, Tensor]:
        """The guide's variables ``u`` that give the model latents ``latents`` (broadcast to the
        chains' shapes), checked by running the guide on them.

        A guide site named like a model latent is its inverse transform; an auxiliary site
        ``{name}_unconstrained`` (``AutoNormal``) the inverse of the model site's ``biject_to``; the
        auxiliary latent of an ``AutoContinuous`` guide the concatenation of those, in its order.
        """
        shapes = self.sample()
        out = {}
        for name, like in shapes.items():
            if name in latents:
                u = self.transforms[name].inv(latents[name])
            elif name.endswith("_unconstrained") and name[: -len("_unconstrained")] in latents:
                base = name[: -len("_unconstrained")]
                u = biject_to(self.supports[base]).inv(latents[base])
            elif hasattr(self.guide, "_unpack_latent") and hasattr(self.guide, "_unconstrained_shapes"):
                order = list(self.guide._unconstrained_shapes)
                u = torch.cat([biject_to(self.supports[n]).inv(latents[n]).reshape(-1) for n in order])
            else:
                raise ValueError(
                    f"guide site '{name}' is auxiliary and its value for the simulated latents is unknown: "
                    "BDMC starts its reverse chains in the guide's variables (supported: guide sites named as "
                    "the model's, AutoNormal's '*_unconstrained' sites, AutoContinuous guides)"
                )
            out[name] = u.expand_as(like).clone()
        if self.deltas:
            with torch.no_grad():
                trace = self._run_guide({k: self.transforms[k](v) for k, v in out.items()})
            for name in self.deltas:
                value: Tensor = trace.nodes[name]["value"]  # type: ignore[assignment]
                if name in latents and not torch.allclose(value, latents[name].expand_as(value), rtol=1e-4, atol=1e-5):
                    raise ValueError(f"guide site '{name}': the guide's variables do not reproduce the simulated value")
        return out

    def log_densities(self, u: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """``(log p(x, T(u)), log q(T(u)), log|det J_T(u)|)``, each ``[C, *B]``, differentiable in ``u``."""
        with validation_off() if self.checked else contextlib.nullcontext():
            densities = self._log_densities(u)
        self.checked = True
        return densities

    def _log_densities(self, u: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        z, log_det = {}, None
        for name, value in u.items():
            transform = self.transforms[name]
            z[name] = transform(value)
            ladj = transform.log_abs_det_jacobian(value, z[name])
            part = self.reduce(ladj, max(ladj.dim() - self.rank, 0))
            log_det = part if log_det is None else log_det + part
        guide_trace = self._run_guide(z)
        values: dict[str, Tensor] = {name: guide_trace.nodes[name]["value"] for name in self.model_latents}  # type: ignore[misc]
        model = _chained(poutine.condition(self.model, data=values), self.num_chains, -self.rank)
        model_trace = poutine.trace(model).get_trace(*self.args, **self.kwargs)
        log_q = self._total(guide_trace, self.guide_sites)
        log_p = self._total(model_trace, [name for name, _ in scored_sites(model_trace, named=True)])
        assert log_det is not None
        if self.deltas:  # the density of u is that of the variables: q(z) |dz/du| = q_vars(u)
            log_det = log_det + self._total(guide_trace, self.latents) - log_q
        return log_p, log_q, log_det

    def _total(self, trace: Trace, names: list[str]) -> Tensor:
        total: Tensor | None = None
        for name in names:
            site: Any = trace.nodes[name]
            try:
                log_prob = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
            except ValueError as error:
                raise ValueError(f"site '{name}': {error}") from error
            part = self.reduce(scale_and_mask(log_prob, site["scale"], site["mask"]))
            total = part if total is None else total + part
        assert total is not None
        return total


def _is_delta(fn: Any) -> bool:
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return isinstance(fn, pyro.distributions.Delta)


def _common_frames(model_trace: Trace, guide_trace: Trace) -> tuple[Any, ...]:
    """The batch plates, a size-less plate with the size its sites give it (as log_weights)."""
    return batch_frames(model_trace, guide_trace)


def simulate(
    model: Model, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """Draw ``(z*, x*) ~ p(z, x)`` by running the model with its observations released
    (``poutine.uncondition``): returns ``(latents, simulated observations, original
    observations)``, each keyed by site name."""
    with torch.no_grad():
        trace = poutine.trace(poutine.uncondition(model)).get_trace(*args, **kwargs)
        with forked_rng(), poutine.block():
            plain = poutine.trace(model).get_trace(*args, **kwargs)
    latents: dict[str, Tensor] = {}
    observed: dict[str, Tensor] = {}
    original: dict[str, Tensor] = {}
    for name, site in scored_sites(trace, named=True):
        if plain.nodes[name]["is_observed"]:
            observed[name] = site["value"].detach()
            original[name] = plain.nodes[name]["value"]  # type: ignore[assignment]
        else:
            latents[name] = site["value"].detach()
    return latents, observed, original


def conditioned(fn: Any, data: dict[str, Tensor]) -> Any:
    """``fn`` with the named sites observed at ``data`` (replacing their ``obs=``)."""
    return poutine.condition(fn, data=data)


def guide_reads_data(
    guide: Guide, args: tuple[Any, ...], kwargs: dict[str, Any], new_args: tuple[Any, ...], new_kwargs: dict[str, Any]
) -> bool:
    """Whether the guide draws differently on ``new_args`` than on ``args`` from the same random
    state: true for an amortized guide given new data, false for one fit to a data set."""
    if (
        all(a is b for a, b in zip(args, new_args))
        and len(args) == len(new_args)
        and all(new_kwargs.get(k) is v for k, v in kwargs.items())
    ):
        return False
    with forked_rng(), torch.no_grad(), poutine.block():
        state = torch.get_rng_state()
        before = poutine.trace(guide).get_trace(*args, **kwargs)
        torch.set_rng_state(state)
        after = poutine.trace(guide).get_trace(*new_args, **new_kwargs)
    for name, site in scored_sites(before, named=True):
        other: Any = after.nodes.get(name)
        if (
            other is None
            or other["value"].shape != site["value"].shape
            or not torch.equal(other["value"], site["value"])
        ):
            return True
    return False
