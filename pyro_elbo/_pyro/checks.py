"""Validation of a model/guide pair: the named errors.

Pyro only *warns* when the guide has a latent site the model lacks, and the reported "ELBO" can
then exceed log p(x). Here every mismatch raises, naming the site, the plate and the fix. Valid
look-alikes pass silently: auxiliary guide sites (``infer={"is_auxiliary": True}``),
``pyro.deterministic`` sites, subsampled plates and masked sites.
"""

from __future__ import annotations

from typing import Any

from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample


def _sample_sites(trace: Trace) -> dict[str, Any]:
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    }


def _is_deterministic(site: Any) -> bool:
    return bool(site["infer"].get("_deterministic", False))


def _plates(site: Any, particle_plate: str | bool) -> dict[str, Any]:
    return {
        frame.name: frame
        for frame in site["cond_indep_stack"]
        if frame.vectorized and frame.name != particle_plate
    }


def check_model_guide(
    model_trace: Trace, guide_trace: Trace, max_plate_nesting: int, particle_plate: str | bool = False
) -> None:
    """Raise ``ValueError`` (or ``NotImplementedError``) if the guide does not match the model.

    Checks, in order: guide latents missing from the model; observed model sites sampled by the
    guide; model latents missing from the guide (including enumerated discrete sites, which are
    not supported); plate membership and sizes of each shared site; event shapes; and that every
    site's batch shape agrees with its plates.
    """
    model_sites = _sample_sites(model_trace)
    guide_sites = _sample_sites(guide_trace)

    for name, site in guide_sites.items():
        if site["is_observed"] or _is_deterministic(site) or site["infer"].get("is_auxiliary", False):
            continue
        if name not in model_sites:
            raise ValueError(
                f"Guide site '{name}' is not a site of the model. A misspelled name makes the bound "
                "meaningless (it can exceed log p(x)); rename it to match the model, or, if it is an "
                "auxiliary variable, declare it with infer={'is_auxiliary': True}."
            )
        if model_sites[name]["is_observed"] and not _is_deterministic(model_sites[name]):
            raise ValueError(
                f"Site '{name}' is observed in the model but sampled in the guide; remove it from "
                "the guide (observed sites have no variational distribution)."
            )

    for name, site in model_sites.items():
        if site["is_observed"] or _is_deterministic(site):
            continue
        if site["infer"].get("enumerate"):
            raise NotImplementedError(
                f"Model site '{name}' is marked for enumeration, which pyro_elbo does not support; "
                "give it a guide site (and train with ELBO or VIMCO) or use pyro.infer.TraceEnum_ELBO."
            )
        if name not in guide_sites:
            raise ValueError(
                f"Model latent site '{name}' has no counterpart in the guide, so it would be drawn "
                "from the prior and scored as if it were data; add a guide site of that name."
            )
        guide_site = guide_sites[name]
        _check_plates(name, site, guide_site, particle_plate)
        model_event = tuple(site["fn"].event_shape)
        guide_event = tuple(guide_site["fn"].event_shape)
        if model_event != guide_event:
            raise ValueError(
                f"Site '{name}' has event shape {model_event} in the model but {guide_event} in the "
                "guide; make them agree (e.g. with .to_event(n) in the guide)."
            )

    for role, sites in (("model", model_sites), ("guide", guide_sites)):
        for name, site in sites.items():
            _check_batch_shape(role, name, site, max_plate_nesting, particle_plate)


def _check_plates(name: str, model_site: Any, guide_site: Any, particle_plate: str | bool) -> None:
    model_plates = _plates(model_site, particle_plate)
    guide_plates = _plates(guide_site, particle_plate)
    for plate, frame in guide_plates.items():
        if plate not in model_plates:
            raise ValueError(f"Site '{name}' is inside plate '{plate}' in the guide but not in the model.")
        other = model_plates[plate]
        if frame.size != other.size or frame.full_size != other.full_size:
            raise ValueError(
                f"Plate '{plate}' at site '{name}' has size {frame.size} (of {frame.full_size}) in the "
                f"guide but {other.size} (of {other.full_size}) in the model; use the same size and "
                "subsample_size in both."
            )
    for plate in model_plates:
        if plate not in guide_plates:
            raise ValueError(f"Site '{name}' is inside plate '{plate}' in the model but not in the guide.")


def _check_batch_shape(role: str, name: str, site: Any, max_plate_nesting: int, particle_plate: str | bool) -> None:
    batch_shape = tuple(site["fn"].batch_shape)
    if site["is_observed"] and _is_deterministic(site):
        return
    by_dim = {frame.dim: frame for frame in site["cond_indep_stack"] if frame.vectorized}
    limit = max_plate_nesting + (1 if particle_plate else 0)
    if len(batch_shape) > limit:
        raise ValueError(
            f"{role.capitalize()} site '{name}' has batch shape {batch_shape}, more dims than the "
            f"{max_plate_nesting} plate dims in use; declare its dims with pyro.plate or move them "
            "to the event with .to_event(n)."
        )
    for offset in range(1, len(batch_shape) + 1):
        size = batch_shape[-offset]
        frame = by_dim.get(-offset)
        if frame is None and size != 1:
            raise ValueError(
                f"{role.capitalize()} site '{name}' has batch shape {batch_shape}, but dim {-offset} "
                f"(size {size}) belongs to no pyro.plate; wrap the site in a plate for that dim or use "
                ".to_event(n)."
            )
        if frame is not None and size not in (1, frame.size):
            raise ValueError(
                f"{role.capitalize()} site '{name}' has batch shape {batch_shape}: dim {-offset} has "
                f"size {size} but plate '{frame.name}' there has size {frame.size}."
            )
