"""Which plates each observed site sits in: what the ArviZ export needs to add several observed
sites' pointwise log-likelihoods into one per-data-point log-likelihood."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyro.poutine as poutine
import torch

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
