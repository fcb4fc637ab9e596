"""Running model and guide: the particle plate, the guide's trace (Messenger guides included), the
model replayed against it, plate nesting, and the failures named when a run breaks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, NoReturn

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.tracegraph_elbo import TrackNonReparam
from pyro.poutine.guide import GuideMessenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from pyro_elbo._pyro import checks, enum, supports
from pyro_elbo._pyro.cache import ProgramCache
from pyro_elbo._pyro.params import params_stopped
from pyro_elbo._pyro.particles import argument_signature
from pyro_elbo._random import forked_rng
from pyro_elbo._typing import Guide, Model
from pyro_elbo.compile.torch_internals import inside_make_fx

PARTICLE_PLATE = "_pyro_elbo_particles"


def guess_max_plate_nesting(model: Model, guide: Guide, *args: Any, **kwargs: Any) -> int:
    """Run guide and model once to find how many plate dims they use.

    The run also creates lazily initialized parameters (autoguides, ``pyro.param``). It runs
    inside :func:`torch.random.fork_rng`, so the caller's random stream is left where it was and a
    seeded run gives the same draws whether or not this was called first.
    """
    try:
        with forked_rng(), torch.no_grad(), poutine.block():
            guide_trace, model_trace = trace_guide(guide, args, kwargs)
            try:
                if model_trace is None:
                    model_trace = run_model(model, guide_trace, args, kwargs)
            except Exception as error:
                _diagnose_model_failure(model, guide_trace, args, kwargs, None, 1, error)
                raise
    except ValueError as error:  # Pyro's bare plate shape mismatch, named (a missing .to_event)
        named = checks.plate_mismatch_error(error)
        if named is None:
            raise
        raise named from error
    return plate_nesting(guide_trace, model_trace)


def _tensor(value: Any) -> Tensor:
    assert isinstance(value, Tensor)
    return value


def plate_nesting(*traces: Trace) -> int:
    dims = [
        -frame.dim
        for trace in traces
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized and frame.dim is not None
    ]
    return max(dims, default=0)


# --------------------------------------------------------------------------------------------
# tracing


def particle_plated(fn: Any, num_particles: int, dim: int) -> Any:
    if num_particles == 1:
        return fn

    def plated(*args: Any, **kwargs: Any) -> Any:
        with pyro.plate(PARTICLE_PLATE, num_particles, dim=dim):
            return fn(*args, **kwargs)

    return plated


def trace_guide(
    guide: Guide,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    num_particles: int = 1,
    dim: int = -1,
    replay: Trace | None = None,
) -> tuple[Trace, Trace | None]:
    """Run the guide (in the particle plate, replaying ``replay`` if given): its trace, and for a
    guide that runs the model inside itself (Pyro's ``GuideMessenger`` autoguides, e.g.
    ``AutoNormalMessenger``) the model trace of that run.

    Such a guide's own trace also holds the model's observed and ``pyro.factor`` sites; its
    ``get_traces()`` separates them, as Pyro's ``get_importance_trace`` does."""
    unwrapped = poutine.unwrap(guide)
    plated = particle_plated(guide, num_particles, dim)
    replaying = poutine.replay(trace=replay) if replay is not None else contextlib.nullcontext()
    if isinstance(unwrapped, GuideMessenger):
        with replaying:
            plated(*args, **kwargs)
        model_trace, guide_trace = unwrapped.get_traces()
        return guide_trace, model_trace
    with replaying:
        return poutine.trace(plated).get_trace(*args, **kwargs), None


def run_model(model: Model, guide_trace: Trace, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Trace:
    """The model's trace with its latent sites replayed from ``guide_trace``."""
    return poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)


def traces(
    model: Model,
    guide: Guide,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    num_particles: int,
    max_plate_nesting: int,
    detach_model_params: bool,
    sample_guide_enumerated: bool = False,
) -> tuple[Trace, Trace]:
    """The guide's trace (``num_particles`` in the particle plate at dim ``-max_plate_nesting - 1``)
    and the model's, replayed on it. A guide site marked for enumeration is enumerated
    (``poutine.enum``, as ``TraceEnum_ELBO`` does), or with ``sample_guide_enumerated`` drawn from
    its guide distribution and unmarked (:func:`~pyro_elbo._pyro.enum.without_enumerate_marks`):
    the guide is then the same program with its enumerated sites sampled (the export's draws)."""
    dim = -max_plate_nesting - 1
    plated_model = particle_plated(model, num_particles, dim)
    try:
        if sample_guide_enumerated:
            guide_trace, inner_model_trace = trace_guide(guide, args, kwargs, num_particles, dim)
            guide_trace = enum.without_enumerate_marks(guide_trace)
        else:
            with params_stopped() if detach_model_params and _is_messenger(guide) else contextlib.nullcontext():
                guide_trace, inner_model_trace = _trace_guide_tracked(model, guide, args, kwargs, num_particles, dim)
        try:
            with params_stopped() if detach_model_params else contextlib.nullcontext():
                model_trace = (
                    inner_model_trace
                    if inner_model_trace is not None
                    else run_model(plated_model, guide_trace, args, kwargs)
                )
        except Exception as error:
            _diagnose_model_failure(plated_model, guide_trace, args, kwargs, max_plate_nesting, num_particles, error)
            raise
    except (RuntimeError, ValueError, IndexError, TypeError) as error:
        if isinstance(error, _OutsideSupport):  # the draw's doing, not the particle plate's
            raise
        if num_particles == 1:
            _raise_plate_mismatch(error)
        named = checks.diagnose_shape_failure(model, guide, args, kwargs, max_plate_nesting)
        if isinstance(error, _NamedMismatch) and named is not None:
            _raise_plate_mismatch(error)  # the program's own mismatch, named on the guide's values
        # a mismatch seen only with the particles batched (a model not written for batched latents,
        # e.g. a PyroSample hyperparameter of a GP kernel) is the plate's doing, not the program's
        if named is not None:
            raise (checks.plate_mismatch_error(named) or named) from error
        raise ValueError(
            f"The model or guide failed when its {num_particles} particles were drawn in one "
            f"vectorized pass (an outer pyro.plate at dim {dim}): {type(error).__name__}: {error}. "
            "A model not written for batched latents (e.g. `x @ w` with a vector latent `w`) "
            "cannot broadcast over particles: leave vectorize_particles='auto' (the default) to "
            "draw them with torch.func.vmap or one at a time, or use num_particles=1."
        ) from error
    return model_trace, guide_trace


#: model/guide pairs whose guide declares Pyro baseline options (their values carry provenance)
#: -> the dependencies found by the last eager run, ``(role, site) -> sites`` (see :func:`dependencies`)
_TRACKED = ProgramCache()


def capturing() -> bool:
    """Whether the code runs inside a ``make_fx`` capture (:mod:`pyro_elbo.compile.graph`)."""
    return inside_make_fx()


def dependencies(
    model: Model, guide: Guide, found: dict[tuple[str, str], frozenset[str]]
) -> dict[tuple[str, str], frozenset[str]]:
    """The non-reparameterized sites each log-density depends on, for a guide with baseline options.

    Eager runs track them (``found``, from Pyro's provenance) and keep them; a captured run
    cannot carry Pyro's ``ProvenanceTensor`` through ``make_fx``, so it reads the last eager run's
    (a program that can be captured has one structure, the same on every step)."""
    if capturing():
        return dict(_TRACKED.get(model, guide) or {})
    _TRACKED.put(model, guide, dict(found))
    return found


def has_baseline_options(trace: Trace) -> bool:
    """Whether a guide site declares ``infer={"baseline": ...}`` (``TraceGraph_ELBO``'s options)."""
    return any(site["infer"].get("baseline") for site in scored_sites(trace))


#: model/guide pair -> argument signature -> what its guide showed: ``(enumerates, declares baselines)``
_FLAGS = ProgramCache()


def _guide_flags(guide: Guide, guide_trace: Trace) -> tuple[bool, bool]:
    """Whether the guide marks a latent site ``infer={"enumerate": "parallel"}`` (``config_enumerate``
    on the guide), and whether it declares Pyro's baseline options. ``GuideMessenger`` guides are
    never enumerated (nor are they by ``TraceEnum_ELBO``).

    Raises:
        NotImplementedError: a guide site is marked for ``"sequential"`` enumeration.
    """
    enumerates = False
    for name, site in scored_sites(guide_trace, named=True):
        how = site["infer"].get("enumerate")
        if not how or site["is_observed"] or _is_messenger(guide):
            continue
        if how != "parallel":
            raise NotImplementedError(
                f"Guide site '{name}' is marked for enumeration ({how!r}); only 'parallel' enumeration of guide "
                "sites is supported (config_enumerate's default, as in pyro.infer.TraceEnum_ELBO)."
            )
        enumerates = True
    return enumerates, has_baseline_options(guide_trace)


def _trace_guide_tracked(
    model: Model, guide: Guide, args: tuple[Any, ...], kwargs: dict[str, Any], num_particles: int, dim: int
) -> tuple[Trace, Trace | None]:
    """The guide's trace. A guide that enumerates runs under ``poutine.enum``, its enumeration dims
    left of the particle dim ``dim`` (as ``TraceEnum_ELBO`` places them left of its particle plate).
    A guide with baseline options runs under Pyro's ``TrackNonReparam``, so each log-density knows
    which non-reparameterized sites it depends on (``TraceGraph_ELBO``'s downstream costs), except
    in a capture, which reads the eager run's (:func:`dependencies`).

    The flags are kept per model/guide pair and argument signature (a guide may enumerate only
    some calls: ss_vae's, for its unlabelled batches, where ``ys`` is ``None``). The first run with
    a signature finds them; if it finds one, the random state is put back and the guide runs again
    the right way, so the draws are those of Pyro's ``TraceEnum_ELBO`` or ``TraceGraph_ELBO`` from
    the first step on. A later eager run without flags still looks for them (a structure that
    changes with the values) and, finding one, runs again the right way."""
    known = _FLAGS.get(model, guide)
    if known is None:
        known = {}
        _FLAGS.put(model, guide, known)
    signature = argument_signature(args, kwargs)
    flags = known.get(signature)
    if flags is None or not (any(flags) or capturing()):
        state = pyro.util.get_rng_state() if flags is None else None
        guide_trace, inner_model_trace = trace_guide(guide, args, kwargs, num_particles, dim)
        found = _guide_flags(guide, guide_trace)
        if flags is None or any(found):
            known[signature] = found
        if not any(found):
            return guide_trace, inner_model_trace
        if state is not None:
            pyro.util.set_rng_state(state)
        flags = found
    enumerates, baselines = flags
    if enumerates:
        return trace_guide(poutine.enum(guide, first_available_dim=dim - 1), args, kwargs, num_particles, dim)
    if not baselines or capturing():
        return trace_guide(guide, args, kwargs, num_particles, dim)
    with TrackNonReparam():
        return trace_guide(guide, args, kwargs, num_particles, dim)


def _raise_plate_mismatch(error: Exception) -> NoReturn:
    """Raise ``error``, as the plate mismatch it names where it names one."""
    plate_error = checks.plate_mismatch_error(error)
    if plate_error is None:
        raise error
    raise plate_error from error


def _is_messenger(guide: Guide) -> bool:
    return isinstance(poutine.unwrap(guide), GuideMessenger)


class _NamedMismatch(ValueError):
    """A model/guide mismatch found after the model failed on the guide's values."""

    names_a_mismatch = True


class _OutsideSupport(_NamedMismatch):
    """The model failed on a guide draw outside its support (a guide support wider than the model's)."""


def _diagnose_model_failure(
    plated_model: Any,
    guide_trace: Trace,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    max_plate_nesting: int | None,
    num_particles: int,
    error: Exception,
) -> None:
    """The model failed on the guide's values: if its own prior draws run, name the mismatch."""
    try:
        with forked_rng(), torch.no_grad(), poutine.block():
            prior_trace = poutine.trace(plated_model).get_trace(*args, **kwargs)
    except Exception:
        return
    if max_plate_nesting is None:
        max_plate_nesting = plate_nesting(guide_trace, prior_trace)
    try:
        marked = enum.guide_marked_sites(guide_trace)
        prior_trace = enum.without_sites(prior_trace, enum.enumerated_sites(prior_trace, guide_trace, bool(marked)))
        checks.check_model_guide(
            prior_trace, guide_trace, max_plate_nesting, num_particles > 1 and PARTICLE_PLATE, guide_enumerated=marked
        )
    except ValueError as mismatch:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise _NamedMismatch(f"{mismatch} (The model failed on the guide's values: {first_line})") from error
    outside = supports.draws_outside(prior_trace, guide_trace)
    if outside is not None:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise _OutsideSupport(f"{outside} (The model failed on that value: {first_line})") from error


def scored_sites(trace: Trace, named: bool = False) -> Iterator[Any]:
    """Sample sites that contribute a log-density (not plate subsample sites)."""
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        yield (name, site) if named else site


def subsampled_plates(*traces: Trace) -> dict[str, Any]:
    """Plate name -> frame, for every plate of the scored sites that sees a subsample of its data."""
    return {
        frame.name: frame
        for trace in traces
        for site in scored_sites(trace)
        for frame in site["cond_indep_stack"]
        if frame.full_size not in (None, frame.size) and frame.name != PARTICLE_PLATE
    }


def batch_frames(model_trace: Trace, guide_trace: Trace) -> tuple[Any, ...]:
    """The plates shared by every scored site of model and guide, outermost first.

    A plate without a size (``pyro.plate("data")``) is one when its size can be read off its
    sites, as Pyro broadcasts it: every site in it has the same size ``N`` at the plate's dim
    (its frame then carries ``N``); a site that has one value for all ``N`` is shared by every
    point, and the plate is no batch plate (:func:`sizeless_plate_sizes`)."""
    common: dict[str, Any] | None = None
    for trace in (model_trace, guide_trace):
        for site in scored_sites(trace):
            frames = {f.name: f for f in site["cond_indep_stack"] if f.vectorized and f.name != PARTICLE_PLATE}
            common = frames if common is None else {k: v for k, v in common.items() if k in frames}
    inferred, _ = sizeless_plate_sizes(model_trace, guide_trace)
    found = []
    for name, frame in (common or {}).items():
        if frame.size not in (None, -1):
            found.append(frame)
        elif inferred.get(name) is not None:
            found.append(frame._replace(size=inferred[name], full_size=inferred[name]))
    return tuple(sorted(found, key=lambda frame: frame.dim))


def _batch_size_at(site: Any, dim: int) -> int:
    """The size of a site's log-density at plate dim ``dim`` (1 when it does not reach it)."""
    fn, value = site["fn"], site["value"]
    event = len(getattr(fn, "event_shape", ()))
    shape = tuple(getattr(fn, "batch_shape", ()))
    if isinstance(value, Tensor):
        value_shape = tuple(value.shape[: value.dim() - event]) if event else tuple(value.shape)
        try:
            shape = tuple(torch.broadcast_shapes(shape, value_shape))
        except RuntimeError:
            pass
    return int(shape[dim]) if len(shape) >= -dim else 1


def sizeless_plate_sizes(*traces: Trace) -> tuple[dict[str, int | None], dict[str, str]]:
    """Every plate without a size -> the size its sites give it, or ``None`` when a site in it has
    one value for all points (that site is named in the second dict: plate -> why)."""
    sizes: dict[str, dict[str, int]] = {}
    for trace in traces:
        for name, site in scored_sites(trace, named=True):
            if (site.get("infer") or {}).get("_deterministic"):
                continue  # pyro.deterministic: no density, and its whole value is one event
            for frame in site["cond_indep_stack"]:
                if frame.vectorized and frame.size == -1 and frame.dim is not None:
                    sizes.setdefault(frame.name, {})[name] = _batch_size_at(site, frame.dim)
    inferred: dict[str, int | None] = {}
    why: dict[str, str] = {}
    for plate, by_site in sizes.items():
        size = max(by_site.values())
        shared = sorted(site for site, n in by_site.items() if n != size)
        inferred[plate] = None if shared else size
        if shared:
            why[plate] = (
                f"plate '{plate}' has no size; its sites give it {size}, but site(s) {shared} have one value for "
                f"all {size} points (Pyro broadcasts them), so they are shared, not per point"
            )
    return inferred, why
