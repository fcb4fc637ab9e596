"""Which plates each observed site sits in: what the ArviZ export needs to add several observed
sites' pointwise log-likelihoods into one per-data-point log-likelihood; and what the model
observes per data point (IWAE's log-evidence)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyro.poutine as poutine
import torch

from pyro_elbo._pyro.density import Observed
from pyro_elbo._pyro.tracing import scored_sites
from pyro_elbo._random import forked_rng
from pyro_elbo._typing import Guide, Model


@dataclass(frozen=True)
class Plate:
    """A vectorized plate: its name, its (negative) batch dim and its size."""

    name: str
    dim: int
    size: int


def observed_plates(model: Model, guide: Guide, *args: Any, **kwargs: Any) -> dict[str, tuple[Plate, ...]]:
    """Observed site -> its vectorized plates, outermost first, from one run of the model on a
    guide draw (without gradients, without moving the caller's random stream).

    Raises:
        ValueError: if a plate is subsampled: the export needs the full data set.
    """
    with forked_rng(), torch.no_grad(), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    plates: dict[str, tuple[Plate, ...]] = {}
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or not site["is_observed"] or (site["infer"] or {}).get("_deterministic"):
            continue
        frames = [f for f in site["cond_indep_stack"] if f.vectorized]
        for frame in frames:
            if frame.full_size is not None and frame.size != frame.full_size:
                raise ValueError(
                    f"plate '{frame.name}' is subsampled ({frame.size} of {frame.full_size}); export "
                    "draws with the full data set (no subsample_size)."
                )
        plates[name] = tuple(
            sorted((Plate(f.name, f.dim, f.size) for f in frames if f.dim is not None), key=lambda p: p.dim)
        )
    return plates


def observed_per_point(
    model: Model, guide: Guide, args: tuple[Any, ...], kwargs: dict[str, Any], num_points: int
) -> Observed:
    """What the model observes per data point (``num_points`` of them), from one run of the model
    on a guide draw (without gradients, without moving the caller's random stream). Unlike AIS,
    IWAE needs nothing of the latents: enumerated sites, auxiliary and point-mass guide sites are
    all fine here.

    Raises:
        ValueError: if an observed site's plate is subsampled: the evidence is per point of the full data.
    """
    with forked_rng(), torch.no_grad(), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    sites = [site for _, site in scored_sites(model_trace, named=True) if site["is_observed"]]
    for site in sites:
        for frame in site["cond_indep_stack"]:
            if frame.vectorized and frame.full_size not in (None, frame.size):
                raise ValueError(
                    f"plate '{frame.name}' is subsampled ({frame.size} of {frame.full_size}); score "
                    "the data without subsample_size (pass batches through a DataLoader instead)"
                )
    dims = sum(torch.as_tensor(site["value"]).numel() for site in sites)
    discrete = bool(sites) and all(site["fn"].support.is_discrete for site in sites)
    return Observed(dims // max(num_points, 1), discrete)
