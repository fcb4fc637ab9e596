"""Site helpers shared by the model/guide checks."""

from __future__ import annotations

from typing import Any

from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample


def sample_sites(trace: Trace) -> dict[str, Any]:
    """Name -> site for every sample site except plate subsample sites."""
    return {
        name: site for name, site in trace.nodes.items() if site["type"] == "sample" and not site_is_subsample(site)
    }


def subsample_sites(trace: Trace) -> dict[str, Any]:
    """Name -> site for the subsample site of every plate (vectorized or sequential) in ``trace``."""
    return {name: site for name, site in trace.nodes.items() if site["type"] == "sample" and site_is_subsample(site)}


def is_deterministic(site: Any) -> bool:
    """A ``pyro.deterministic`` site (a recorded value, not a random variable)."""
    return bool(site["infer"].get("_deterministic", False))
