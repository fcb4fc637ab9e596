"""Model structure for the diagnostics: which factors a latent enters, and a guide whose local
sites get free per-data-point parameters (the "optimal" guide of the amortization gap)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import Independent, constraints, transform_to

from pyro_elbo._random import forked_rng
from pyro_elbo._typing import Guide, Model


def site_factors(model: Model, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, list[str]]:
    """Latent site -> the sites whose factor it enters (its children), via Pyro's provenance
    tracking. Empty if the model cannot be analysed."""
    try:
        from pyro.infer.inspect import get_dependencies

        with forked_rng(), poutine.block():
            deps = get_dependencies(model, args, kwargs)["prior_dependencies"]
        with forked_rng(), poutine.block(), torch.no_grad():
            trace = poutine.trace(model).get_trace(*args, **kwargs)
    except Exception as error:  # analysis is best effort; the report still has overall k-hat
        warnings.warn(f"per-site k-hat skipped: could not analyse the model's dependencies ({error})", stacklevel=3)
        return {}
    latent = [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    ]
    return {z: [c for c, parents in deps.items() if c != z and z in parents] for z in latent}


class FreeLocalGuide(Messenger):
    """Runs a guide with each local site's distribution replaced by the same family with free
    per-data-point parameters (initialized from one run of the amortized guide)."""

    def __init__(self, guide: Guide, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.guide = guide
        with torch.no_grad(), forked_rng():
            trace = poutine.trace(guide).get_trace(*args, **kwargs)
        self.sites: dict[str, tuple[Callable[..., Any], dict[str, Tensor]]] = {}
        self._params: list[Tensor] = []
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
                continue
            build, free = _free_parameters(name, site["fn"])
            self.sites[name] = (build, free)
            self._params.extend(free.values())

    def parameters(self) -> list[Tensor]:
        return self._params

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self:
            return self.guide(*args, **kwargs)

    def _pyro_sample(self, msg: Any) -> None:
        if msg["name"] in self.sites and not msg["is_observed"]:
            build, free = self.sites[msg["name"]]
            fn = build(free)
            target = msg["fn"].batch_shape
            msg["fn"] = fn.expand(torch.broadcast_shapes(fn.batch_shape, target)) if fn.batch_shape != target else fn


_FREE_PARAMS = ("loc", "scale", "scale_tril", "logits", "concentration", "rate", "concentration1", "concentration0", "df")


def _free_parameters(name: str, fn: Any) -> tuple[Callable[[dict[str, Tensor]], Any], dict[str, Tensor]]:
    """Unconstrained free copies of a distribution's parameters and a function rebuilding it."""
    if isinstance(fn, Independent):
        build_base, free = _free_parameters(name, fn.base_dist)
        ndims = fn.reinterpreted_batch_ndims
        return (lambda p: Independent(build_base(p), ndims)), free
    if isinstance(fn, pyro.distributions.MultivariateNormal):
        values = {"loc": fn.loc, "scale_tril": fn.scale_tril}
    else:
        values = {k: getattr(fn, k) for k in _FREE_PARAMS if k in fn.arg_constraints and k in vars(fn)}
    if not values:
        raise NotImplementedError(
            f"gap_decomposition cannot free the parameters of site '{name}' ({type(fn).__name__}); "
            f"supported parameters: {', '.join(_FREE_PARAMS)}"
        )
    cons = {k: fn.arg_constraints[k] for k in values}
    free = {
        k: transform_to(cons[k]).inv(v.detach().clone()).requires_grad_()
        if cons[k] is not constraints.real
        else v.detach().clone().requires_grad_()
        for k, v in values.items()
    }
    cls = type(fn)

    def build(p: Mapping[str, Tensor]) -> Any:
        return cls(**{k: transform_to(cons[k])(p[k]) for k in values}, validate_args=False)

    return build, free
