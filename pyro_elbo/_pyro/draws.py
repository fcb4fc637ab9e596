"""Guide draws for export: every site in its natural shape, particles on dim 0."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from torch import Tensor

from pyro_elbo._pyro import checks
from pyro_elbo._pyro.log_weights import (
    PARTICLE_PLATE,
    guess_max_plate_nesting,
    particle_plated,
    scored_sites,
    subsampled_plates,
    traces,
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
    """

    latent: dict[str, Tensor]
    deterministic: dict[str, Tensor]
    log_likelihood: dict[str, Tensor]
    predictive: dict[str, Tensor]
    observed: dict[str, Tensor]
    log_p: Tensor
    log_q: Tensor


def posterior_draws(
    model: Model,
    guide: Guide,
    *args: Any,
    num_samples: int,
    max_plate_nesting: int | None = None,
    predictive: bool = True,
    **kwargs: Any,
) -> Draws:
    """Draw ``num_samples`` particles from the guide in one vectorized pass, without gradients.

    Raises:
        ValueError: if a plate is subsampled (export the full data set).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if max_plate_nesting is None:
        max_plate_nesting = guess_max_plate_nesting(model, guide, *args, **kwargs)
    with torch.no_grad(), forked_rng(), poutine.block():
        reference = poutine.trace(poutine.replay(model, trace=poutine.trace(guide).get_trace(*args, **kwargs)))
        reference_trace = reference.get_trace(*args, **kwargs)
    with torch.no_grad():
        model_trace, guide_trace = traces(model, guide, args, kwargs, num_samples, max_plate_nesting, False)
        checks.check_model_guide(model_trace, guide_trace, max_plate_nesting, num_samples > 1 and PARTICLE_PLATE)
        for frame in subsampled_plates(model_trace, guide_trace).values():
            raise ValueError(
                f"plate '{frame.name}' is subsampled ({frame.size} of {frame.full_size}); export "
                "draws with the full data set (no subsample_size)."
            )
        reducer = Reducer(max_plate_nesting, num_samples, (), 1.0)
        log_p = reducer.total(reducer(site) for site in scored_sites(model_trace))
        log_q = reducer.total(reducer(site) for site in scored_sites(guide_trace))
        shaped = _Shaper(reference_trace, num_samples)
        latent, deterministic, log_lik, observed = {}, {}, {}, {}
        for name, site in scored_sites(model_trace, named=True):
            if site["infer"].get("_deterministic"):
                deterministic[name] = shaped.value(name, site["value"])
            elif site["is_observed"]:
                observed[name] = reference_trace.nodes[name]["value"]
                log_lik[name] = shaped.batch(name, site["fn"].log_prob(site["value"]))
            else:
                latent[name] = shaped.value(name, site["value"])
        pred: dict[str, Tensor] = {}
        if predictive and observed:
            plated = particle_plated(_ResampleObserved()(model), num_samples, -max_plate_nesting - 1)
            latent_only = Trace()
            for name, site in guide_trace.nodes.items():
                if site["type"] == "sample" and name not in observed:
                    latent_only.add_node(name, **site)
            pred_trace = poutine.trace(poutine.replay(plated, trace=latent_only)).get_trace(*args, **kwargs)
            pred = {name: shaped.value(name, pred_trace.nodes[name]["value"]) for name in observed}
    return Draws(latent, deterministic, log_lik, pred, observed, log_p, log_q)


class _ResampleObserved(Messenger):
    """Like ``poutine.uncondition`` but leaves ``pyro.deterministic`` sites alone."""

    def _pyro_sample(self, msg: Any) -> None:
        if msg["is_observed"] and not msg["infer"].get("_deterministic", False):
            msg["is_observed"] = False
            msg["value"] = None
            msg["done"] = False


class _Shaper:
    """Reshapes vectorized site values ``[S, 1, ..., *shape]`` to ``[S, *shape]``."""

    def __init__(self, reference: Trace, num_samples: int) -> None:
        self.reference = reference
        self.num = num_samples

    def value(self, name: str, value: Tensor) -> Tensor:
        shape = tuple(self.reference.nodes[name]["value"].shape)
        return self._reshape(name, value, shape)

    def batch(self, name: str, value: Tensor) -> Tensor:
        site = self.reference.nodes[name]
        shape = tuple(site["fn"].batch_shape)
        return self._reshape(name, value, shape)

    def _reshape(self, name: str, value: Tensor, shape: tuple[int, ...]) -> Tensor:
        target = (self.num, *shape)
        if value.numel() == math.prod(target):
            return value.reshape(target)
        if value.numel() == math.prod(shape):  # does not depend on the particles: repeat it
            return value.reshape(shape).expand(target).clone()
        raise ValueError(
            f"site '{name}' has shape {tuple(value.shape)} with {self.num} particles but {shape} without; "
            "cannot tell its particle dim apart (pass vectorize-friendly shapes or fewer plates)"
        )

