"""Validation of a model/guide pair: the named errors.

Pyro only *warns* when the guide has a latent site the model lacks, and the reported "ELBO" can
then exceed log p(x). Here every mismatch raises, naming the site, the plate and the fix. Valid
look-alikes pass silently: auxiliary guide sites (``infer={"is_auxiliary": True}``),
``pyro.deterministic`` sites, subsampled plates, masked sites, size-less plates
(``pyro.plate("p")``), size-1 batch dims outside every plate, and batch dims right of a plate dim
that belong to no plate (summed, as Pyro's ``Trace_ELBO`` does).

The shape rule is Pyro's (``pyro.util.check_site_shape`` with unbounded ``max_plate_nesting``):
a site's ``log_prob`` batch shape (its distribution's batch shape broadcast with the value's) must
have the plate's size at each plate dim, and size 1 left of the site's leftmost plate. Observed
values that broadcast the ``log_prob`` beyond the distribution's batch shape (data shaped
``[18, 1]`` for a site expecting ``[18]``) are named with the expected and actual shapes.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import pyro.poutine as poutine
import torch
from pyro.infer.util import is_validation_enabled
from pyro.poutine.trace_struct import Trace

from pyro_elbo._pyro import enum
from pyro_elbo._pyro._sites import is_deterministic, sample_sites, subsample_sites
from pyro_elbo._pyro.supports import check_supports
from pyro_elbo._random import forked_rng

__all__ = [
    "GuidePlateWarning",
    "InferOptionWarning",
    "check_guide_plates",
    "check_model_guide",
    "check_supports",
    "diagnose_shape_failure",
    "plate_mismatch_error",
    "site_shape_error",
]


class GuidePlateWarning(UserWarning):
    """A plate (vectorized or sequential) in the guide that the model does not have (Pyro warns too)."""


class InferOptionWarning(UserWarning):
    """A site's ``infer`` dict holds a key that pyro_elbo does not act on (said once per key)."""


#: ``infer`` keys read here, or set by Pyro's own handlers for bookkeeping that needs nothing here
_KNOWN_INFER_KEYS = frozenset(
    {
        "enumerate",  # model sites summed out (enum.py)
        "expand",  # the shape of an enumeration, not its value
        "is_auxiliary",
        "baseline",  # TraceGraph_ELBO's baselines (score.py)
        "_deterministic",
        "is_observed",  # poutine.reparam's reparameterizers
        "was_observed",  # poutine.uncondition
        "obs",
        "prior",  # GuideMessenger autoguides
        "_enumerate_dim",
        "_enumerate_symbol",
        "_dim_to_symbol",
        "_dim_to_id",
        "_markov_scope",
        "_markov_depth",
        "_enum_total",
        "_do_not_trace",
    }
)

#: keys Pyro reads that pyro_elbo does not, and what that means
_IGNORED_INFER_KEYS = {
    "num_samples": "Pyro's sampled enumeration; enumerated sites are summed out exactly here",
    "tmc": "Pyro's TraceTMC_ELBO option; the site is sampled or summed as without it",
    "_do_not_score": "pyro.contrib.funsor's flag; the site is scored here",
}

_warned_infer_keys: set[str] = set()


def warn_unknown_infer_keys(*traces: Trace) -> None:
    """Warn once per key (:class:`InferOptionWarning`) about ``infer`` keys that change nothing here."""
    for trace in traces:
        for name, site in sample_sites(trace).items():
            for key in site["infer"]:
                if key in _KNOWN_INFER_KEYS or key in _warned_infer_keys:
                    continue
                _warned_infer_keys.add(key)
                why = _IGNORED_INFER_KEYS.get(key, "a key neither Pyro nor pyro_elbo reads (a misspelling?)")
                warnings.warn(
                    f"pyro_elbo: infer={{{key!r}: ...}} at site '{name}' has no effect here ({why}).",
                    InferOptionWarning,
                    stacklevel=2,
                )


def _plates(site: Any, particle_plate: str | bool) -> dict[str, Any]:
    return {
        frame.name: frame for frame in site["cond_indep_stack"] if frame.vectorized and frame.name != particle_plate
    }


def check_model_guide(
    model_trace: Trace,
    guide_trace: Trace,
    max_plate_nesting: int,
    particle_plate: str | bool = False,
    supports: bool = True,
    guide_enumerated: tuple[str, ...] = (),
) -> None:
    """Raise ``ValueError`` (or ``NotImplementedError``) if the guide does not match the model.

    Checks, in order: guide latents missing from the model; observed model sites sampled by the
    guide; ``pyro.factor`` in the guide without ``has_rsample``; enumeration flags (naming where
    each was set); model latents missing from the guide; plate membership and sizes of each shared
    site; event shapes; that every site's ``log_prob`` batch shape agrees with its plates; plates
    only in the guide (a :class:`GuidePlateWarning`); and, with ``supports=True``, that no guide site
    can draw outside its model site's support (:func:`~pyro_elbo._pyro.supports.check_supports`;
    pass ``False`` where the caller checks supports once per model/guide pair).

    Args:
        model_trace, guide_trace: one run of each (the model replayed on the guide's values).
        max_plate_nesting: plate dims in use, not counting the particle plate.
        particle_plate: name of the outer particle plate (left of every user plate), or False.
        supports: also compare supports.
        guide_enumerated: guide sites enumerated in parallel (summed out by the caller): their
            flags are not refused, and dims left of the particle dim (enumeration dims) are not
            checked, as in Pyro's ``check_site_shape``.
    """
    model_sites = sample_sites(model_trace)
    guide_sites = sample_sites(guide_trace)
    warn_unknown_infer_keys(model_trace, guide_trace)
    _check_guide_sites(model_sites, guide_sites)
    _check_model_sites(model_sites, guide_sites, particle_plate, guide_enumerated)
    for role, sites in (("model", model_sites), ("guide", guide_sites)):
        for site in sites.values():
            error = site_shape_error(role, site, max_plate_nesting, particle_plate, bool(guide_enumerated))
            if error is not None:
                raise error
    check_guide_plates(model_trace, guide_trace)
    if supports:
        check_supports(model_trace, guide_trace)


def _check_guide_sites(model_sites: dict[str, Any], guide_sites: dict[str, Any]) -> None:
    for name, site in guide_sites.items():
        if _is_unspecified_factor(site) and name not in model_sites:
            raise ValueError(
                f'At guide site pyro.factor("{name}", ...), missing specification of has_rsample: '
                "the estimator must know whether the factor's gradient is a pathwise (reparameterized) "
                "term. Pass has_rsample=True if the factor arises from reparameterized sampling, "
                "has_rsample=False otherwise."
            )
        if site["is_observed"] or is_deterministic(site) or site["infer"].get("is_auxiliary", False):
            continue
        if name not in model_sites:
            raise ValueError(
                f"Guide site '{name}' is not a site of the model. A misspelled name makes the bound "
                "meaningless (it can exceed log p(x)); rename it to match the model, or, if it is an "
                "auxiliary variable, declare it with infer={'is_auxiliary': True}."
            )
        if model_sites[name]["is_observed"] and not is_deterministic(model_sites[name]):
            raise ValueError(
                f"Site '{name}' is observed in the model but sampled in the guide; remove it from "
                "the guide (observed sites have no variational distribution)."
            )


def _is_unspecified_factor(site: Any) -> bool:
    fn = site["fn"]
    return (
        type(fn).__name__ == "Unit"
        and bool(site["infer"].get("is_auxiliary", False))
        and "has_rsample" not in fn.__dict__
    )


def _check_model_sites(
    model_sites: dict[str, Any],
    guide_sites: dict[str, Any],
    particle_plate: str | bool,
    guide_enumerated: tuple[str, ...],
) -> None:
    for name, site in model_sites.items():
        if site["is_observed"] or is_deterministic(site):
            continue
        guide_site = guide_sites.get(name)
        flag = (guide_site or site)["infer"].get("enumerate")
        if flag and name not in guide_enumerated:
            _refuse_enumeration(name, flag, in_guide=guide_site is not None)
        if guide_site is None:
            raise ValueError(
                f"Model latent site '{name}' has no counterpart in the guide, so it would be drawn "
                "from the prior and scored as if it were data; add a guide site of that name."
            )
        _check_plates(name, site, guide_site, particle_plate)
        model_event = tuple(site["fn"].event_shape)
        guide_event = tuple(guide_site["fn"].event_shape)
        if model_event != guide_event:
            what = (
                f"event_dims disagree at site '{name}' ({len(model_event)} vs {len(guide_event)})"
                if len(model_event) != len(guide_event)
                else f"shapes disagree at site '{name}'"
            )
            raise ValueError(
                f"Model and guide {what}: its event shape is {model_event} in the model but {guide_event} "
                "in the guide; make them agree (e.g. with .to_event(n) in the guide)."
            )


def _refuse_enumeration(name: str, flag: Any, in_guide: bool) -> None:
    """An ``infer={"enumerate": ...}`` flag; replay copies a guide site's flag onto the model site."""
    if in_guide:
        raise NotImplementedError(
            f"Guide site '{name}' is marked for enumeration (infer={{'enumerate': {flag!r}}}, e.g. by "
            "config_enumerate on the guide), which pyro_elbo's objectives do not do; remove the flag "
            "from the guide to sample the site (Pyro's Trace_ELBO warns and samples it), or use "
            "pyro.infer.TraceEnum_ELBO."
        )
    raise NotImplementedError(
        f"Model site '{name}' is marked for enumeration (infer={{'enumerate': {flag!r}}}), which "
        "pyro_elbo does not support; give it a guide site (and train with ELBO or VIMCO) or use "
        "pyro.infer.TraceEnum_ELBO."
    )


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


def check_guide_plates(model_trace: Trace, guide_trace: Trace) -> None:
    """Warn (:class:`GuidePlateWarning`) about plates the guide opens and the model does not.

    Pyro's ``Trace_ELBO`` warns the same way ("Found plate statements in guide but not model"); a
    sequential ``for i in pyro.plate(...)`` only in the guide is legal but usually a mistake. Like
    Pyro's, the warning is off under ``pyro.validation_enabled(False)``.
    """
    if not is_validation_enabled():
        return
    extra = sorted(set(subsample_sites(guide_trace)) - set(subsample_sites(model_trace)))
    if extra:
        warnings.warn(
            f"Found plate statements in guide but not model: {', '.join(repr(p) for p in extra)}. The "
            "guide's independence structure then differs from the model's; open the same pyro.plate "
            "in the model or remove it from the guide.",
            GuidePlateWarning,
            stacklevel=2,
        )


def site_shape_error(
    role: str, site: Any, max_plate_nesting: int, particle_plate: str | bool, enumerated: bool = False
) -> ValueError | None:
    """The named shape error of one site, or None (Pyro's ``check_site_shape`` rule, see module doc).
    With ``enumerated``, dims left of the particle dim (enumeration dims) are not checked."""
    if site["is_observed"] and is_deterministic(site):
        return None
    if _sizes_from_data(site):  # a capture (compile=True): the eager run before it checked this site
        return None
    batch_shape = tuple(site["fn"].batch_shape)
    shape, value_error = _log_prob_batch_shape(site, batch_shape)
    if enumerated:
        shape = shape[-(max_plate_nesting + 1) :] if max_plate_nesting + 1 <= len(shape) else shape
    if value_error is not None:
        return _observed_shape_error(site, batch_shape, shape, max_plate_nesting, particle_plate, value_error)
    error = _plate_rule_error(
        f"{role.capitalize()} site '{site['name']}'", site, shape, max_plate_nesting, particle_plate
    )
    if error is not None and site["is_observed"] and shape != batch_shape:
        return _observed_shape_error(site, batch_shape, shape, max_plate_nesting, particle_plate, None)
    return error


def _sizes_from_data(site: Any) -> bool:
    """Whether the site's shapes hold sizes that are not numbers: a step being captured in which
    the size came from data (``x[mask]``). Comparing them would ask the capture for a value it does
    not have; the eager run of the same step, before the capture, checked them as numbers."""
    value = site["value"]
    shapes = (site["fn"].batch_shape, site["fn"].event_shape, value.shape if isinstance(value, torch.Tensor) else ())
    return any(not isinstance(size, int) for shape in shapes for size in shape)


def _plate_rule_error(
    who: str, site: Any, shape: tuple[int, ...], max_plate_nesting: int, particle_plate: str | bool
) -> ValueError | None:
    by_dim = {f.dim: f for f in site["cond_indep_stack"] if f.vectorized and f.name != particle_plate}
    plate_dims = -min(by_dim, default=0)
    particle_dim = max_plate_nesting + 1 if particle_plate else None
    particles = next((f for f in site["cond_indep_stack"] if f.name == particle_plate), None)
    for offset in range(1, len(shape) + 1):
        size = shape[-offset]
        frame = by_dim.get(-offset)
        if frame is not None:
            if frame.size not in (None, -1) and size not in (1, frame.size):
                return ValueError(
                    f"{who} has an invalid log_prob shape: batch shape {_without_particles(shape, particle_dim)}: "
                    f"dim {-offset} has "
                    f"size {size} but plate '{frame.name}' there has size {frame.size}."
                )
        elif offset == particle_dim and particles is not None:
            if size not in (1, particles.size):
                return ValueError(f"{who} has an invalid log_prob shape {shape}: dim {-offset} is the particle dim.")
        elif particle_dim is not None and offset > particle_dim and size != 1:
            return ValueError(
                f"{who} has log_prob batch shape {shape} under {particles.size if particles else '?'} "
                f"vectorized particles (particle dim {-particle_dim}): dim {-offset} (size {size}) is left "
                "of the particle dim, so the model mixes particles (a tensor shaped for one particle, "
                "e.g. a vector latent used as a batch, broadcast against another); the model is not "
                "written for a particle dim. Leave vectorize_particles='auto' (the default) to draw particles "
                "with torch.func.vmap or one at a time."
            )
        elif offset > plate_dims and size != 1:
            where = " and is left of every plate of the site" if plate_dims else ""
            return ValueError(
                f"{who} has an invalid log_prob shape: batch shape {_without_particles(shape, particle_dim)}, "
                f"but dim {-offset} "
                f"(size {size}) belongs to no pyro.plate{where}; wrap the site in a plate for that dim "
                "or move it to the event with .to_event(n)."
            )
    return None


def _log_prob_batch_shape(site: Any, batch_shape: tuple[int, ...]) -> tuple[tuple[int, ...], str | None]:
    """Batch shape of ``log_prob(value)``: the distribution's batch shape broadcast with the value's."""
    value = site["value"]
    if not isinstance(value, torch.Tensor):
        return batch_shape, None
    event_shape = tuple(site["fn"].event_shape)
    value_shape = tuple(value.shape)
    if value_shape == batch_shape + event_shape:
        return batch_shape, None
    cut = len(value_shape) - len(event_shape)
    if cut < 0:
        return batch_shape, None  # fewer dims than the event: the distribution's own check says why
    if _broadcast(value_shape[cut:], event_shape) is None:
        return batch_shape, f"value event shape {value_shape[cut:]} vs the distribution's {event_shape}"
    shape = _broadcast(batch_shape, value_shape[:cut])
    if shape is None:
        return batch_shape, f"value batch shape {value_shape[:cut]} vs the distribution's {batch_shape}"
    return shape, None


def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    """``torch.broadcast_shapes(a, b)`` or None; plain Python (the torch function costs ~1 ms)."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    if any(x != y and x != 1 and y != 1 for x, y in zip(a, b)):
        return None
    return tuple(y if x == 1 else x for x, y in zip(a, b))


def _without_particles(shape: tuple[int, ...], particle_dim: int | None) -> tuple[int, ...]:
    """``shape`` as the user wrote it: the particle dim and any size-1 dims left of it dropped."""
    if particle_dim is None or len(shape) < particle_dim:
        return shape
    return shape[len(shape) - particle_dim + 1 :]


def _observed_shape_error(
    site: Any,
    batch_shape: tuple[int, ...],
    shape: tuple[int, ...],
    max_plate_nesting: int,
    particle_plate: str | bool,
    why: str | None,
) -> ValueError:
    fn = site["fn"]
    particle_dim = max_plate_nesting + 1 if particle_plate else None
    expected = _without_particles(batch_shape, particle_dim) + tuple(fn.event_shape)
    while expected and expected[0] == 1 and len(expected) > len(fn.event_shape):
        expected = expected[1:]
    plates = [
        f"'{f.name}' (size {f.size}, dim {f.dim})"
        for f in site["cond_indep_stack"]
        if f.vectorized and f.name != particle_plate
    ]
    where = f" inside plate {', '.join(plates)}" if plates else ""
    shown = _without_particles(shape, particle_dim)
    outcome = f"they do not broadcast ({why})" if why else f"they broadcast to a log_prob of batch shape {shown}"
    return ValueError(
        f"Observed site '{site['name']}'{where}: the observed value has shape {tuple(site['value'].shape)} "
        f"but the model expects {expected} (batch shape {_without_particles(batch_shape, particle_dim)}, "
        f"event shape {tuple(fn.event_shape)}), and {outcome}. Reshape the data to {expected} (e.g. "
        "y.squeeze(-1) or y.reshape(...)), or declare its extra dims with a pyro.plate or .to_event(n)."
    )


def diagnose_shape_failure(
    model: Any, guide: Any, args: tuple[Any, ...], kwargs: dict[str, Any], max_plate_nesting: int
) -> BaseException | None:
    """Why did model or guide fail under the particle plate? Rerun both once *without* it.

    Call it after a failure of the vectorized pass. Returns:

    - the exception the unplated run raises, if it fails too: the failure has nothing to do with
      particles (a name clash, a ``block_plate`` that matches nothing, Pyro's "Shape mismatch inside
      plate") and that error, not a hint about vectorization, is what the user must see;
    - the named error of :func:`check_model_guide` on the unplated traces (e.g. observed data
      shaped ``[18, 1]`` for a site expecting ``[18]``, naming site, plate and both shapes);
    - ``None`` if the unplated run is valid: the model really cannot take a particle dim.

    The run draws under :func:`~pyro_elbo._random.forked_rng` without gradients and inside
    ``poutine.block``, so the caller's random stream, autograd graph and handlers are untouched.
    """
    with forked_rng(), torch.no_grad(), poutine.block():
        try:
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - handed back to the caller to raise
            return error
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", GuidePlateWarning)  # warned about on the main path
                marked = enum.guide_marked_sites(guide_trace)
                summed = enum.enumerated_sites(model_trace, guide_trace, bool(marked))  # summed out, not checked
                check_model_guide(
                    enum.without_sites(model_trace, summed),
                    guide_trace,
                    max_plate_nesting,
                    False,
                    guide_enumerated=marked,
                )
        except (ValueError, NotImplementedError) as error:
            return error
    return None


# Pyro's BroadcastMessenger: "Shape mismatch inside plate('data') at site y dim -1, 50 vs 3"
_PLATE_MISMATCH = re.compile(
    r"Shape mismatch inside plate\('(?P<plate>[^']*)'\) at site (?P<site>\S+) dim (?P<dim>-?\d+), "
    r"(?P<size>\d+) vs (?P<other>\d+)"
)


def plate_mismatch_error(error: BaseException) -> ValueError | None:
    """Pyro's bare "Shape mismatch inside plate" in the package's words, or None for other errors.

    Pyro raises it while broadcasting a site's distribution to its plates, so the site never
    reaches a trace; the site is read from the failing ``pyro.sample`` message in the error's
    traceback. The usual cause is a multivariate distribution (a vector latent or likelihood)
    written without ``.to_event(n)``: its last dims are taken for batch dims and collide with a
    plate. The message names the site, the plate (size and dim), both shapes, and the
    ``.to_event(n)`` that makes the remaining batch shape fit the site's plates.
    """
    match = _PLATE_MISMATCH.match(str(error)) if isinstance(error, ValueError) else None
    if match is None:
        return None
    plate, site, dim = match["plate"], match["site"], int(match["dim"])
    size, other = int(match["size"]), int(match["other"])
    msg = _failing_sample_message(error)
    if msg is None:
        return ValueError(
            f"Site '{site}' inside plate '{plate}' (size {size}, dim {dim}): its distribution's batch shape has size {other} at dim {dim}, where the plate has "
            f"size {size}. If those {other} values are one multivariate draw, declare them as the event with "
            ".to_event(n) (e.g. dist.Normal(loc, scale).to_event(1)); if they are independent, give them a "
            "pyro.plate of their own at another dim."
        )
    fn = msg["fn"]
    batch, event = tuple(fn.batch_shape), tuple(fn.event_shape)
    role = "Observed site" if msg.get("is_observed") else "Latent site"
    value = msg.get("value")
    observed = f", observed value of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else ""
    frames = [f for f in msg.get("cond_indep_stack", ()) if f.vectorized and f.dim is not None]
    # the fewest trailing batch dims, the mismatching one among them, whose move to the event fits the plates
    n = next((k for k in range(-dim, len(batch) + 1) if _fits_plates(batch[: len(batch) - k], frames)), None)
    shapes = f"its distribution has batch shape {batch} and event shape {event}{observed}"
    otherwise = (
        f"give the distribution's parameters size {size} or 1 at dim {dim}, or give those {other} values a "
        "pyro.plate of their own"
    )
    if n is None:
        fix = otherwise
    else:
        moved = batch[len(batch) - n :]
        fix = (
            f"if the last {n} batch dim(s) {moved} are one multivariate draw (a vector latent or observation), "
            f"declare them as the event with .to_event({n}) (e.g. dist.{type(fn).__name__}(...).to_event({n})): "
            f"batch shape {batch[: len(batch) - n]} and event shape {moved + event}; otherwise {otherwise}"
        )
    return ValueError(
        f"{role} '{site}' inside plate '{plate}' (size {size}, dim {dim}): {shapes}, "
        f"so dim {dim} has size {other} where the plate has size {size}. Fix: {fix}."
    )


def _failing_sample_message(error: BaseException) -> dict[str, Any] | None:
    """The ``pyro.sample`` message that Pyro's plate was broadcasting when it raised ``error``."""
    tb = error.__traceback__
    found = None
    while tb is not None:
        msg = tb.tb_frame.f_locals.get("msg") if tb.tb_frame.f_code.co_name == "_pyro_sample" else None
        if isinstance(msg, dict) and msg.get("type") == "sample" and "fn" in msg:
            found = msg
        tb = tb.tb_next
    return found


def _fits_plates(batch: tuple[int, ...], frames: list[Any]) -> bool:
    """Whether a batch shape has each plate's size (or 1) at that plate's dim."""
    for frame in frames:
        if -frame.dim <= len(batch) and batch[frame.dim] not in (1, frame.size):
            return False
    return True
