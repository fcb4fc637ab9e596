"""Running model and guide: the particle plate, the guide's trace (Messenger guides included), the
model replayed against it, plate nesting, and the failures named when a run breaks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.guide import GuideMessenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from pyro_elbo._pyro import checks, enum
from pyro_elbo._pyro.params import params_stopped
from pyro_elbo._random import forked_rng
from pyro_elbo._typing import Guide, Model

PARTICLE_PLATE = "_pyro_elbo_particles"


def guess_max_plate_nesting(model: Model, guide: Guide, *args: Any, **kwargs: Any) -> int:
    """Run guide and model once to find how many plate dims they use.

    The run also creates lazily initialized parameters (autoguides, ``pyro.param``). It runs
    inside :func:`torch.random.fork_rng`, so the caller's random stream is left where it was and a
    seeded run gives the same draws whether or not this was called first.
    """
    with forked_rng(), torch.no_grad(), poutine.block():
        guide_trace, model_trace = trace_guide(guide, args, kwargs)
        try:
            if model_trace is None:
                model_trace = run_model(model, guide_trace, args, kwargs)
        except Exception as error:
            _diagnose_model_failure(model, guide_trace, args, kwargs, None, 1, error)
            raise
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
) -> tuple[Trace, Trace]:
    dim = -max_plate_nesting - 1
    plated_model = particle_plated(model, num_particles, dim)
    try:
        with params_stopped() if detach_model_params and _is_messenger(guide) else contextlib.nullcontext():
            guide_trace, inner_model_trace = trace_guide(guide, args, kwargs, num_particles, dim)
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
        if num_particles == 1:
            raise
        named = checks.diagnose_shape_failure(model, guide, args, kwargs, max_plate_nesting)
        if isinstance(error, _NamedMismatch) and named is not None:
            raise  # the program's own mismatch, named on the guide's values
        # a mismatch seen only with the particles batched (a model not written for batched latents,
        # e.g. a PyroSample hyperparameter of a GP kernel) is the plate's doing, not the program's
        if named is not None:
            raise named from error
        raise ValueError(
            f"The model or guide failed when its {num_particles} particles were drawn in one "
            f"vectorized pass (an outer pyro.plate at dim {dim}): {type(error).__name__}: {error}. "
            "A model not written for batched latents (e.g. `x @ w` with a vector latent `w`) "
            "cannot broadcast over particles: leave vectorize_particles='auto' (the default) to "
            "draw them with torch.func.vmap or one at a time, or use num_particles=1."
        ) from error
    return model_trace, guide_trace


def _is_messenger(guide: Guide) -> bool:
    return isinstance(poutine.unwrap(guide), GuideMessenger)


class _NamedMismatch(ValueError):
    """A model/guide mismatch found after the model failed on the guide's values."""

    names_a_mismatch = True


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
        prior_trace = enum.without_sites(prior_trace, enum.enumerated_sites(prior_trace, guide_trace))
        checks.check_model_guide(prior_trace, guide_trace, max_plate_nesting, num_particles > 1 and PARTICLE_PLATE)
    except ValueError as mismatch:
        raise _NamedMismatch(f"{mismatch} (The model failed on the guide's values: {error})") from error


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
    """The plates shared by every scored site of model and guide, outermost first."""
    common: dict[str, Any] | None = None
    for trace in (model_trace, guide_trace):
        for site in scored_sites(trace):
            frames = {
                f.name: f
                for f in site["cond_indep_stack"]
                if f.vectorized and f.name != PARTICLE_PLATE and f.size not in (None, -1)
            }
            common = frames if common is None else {k: v for k, v in common.items() if k in frames}
    return tuple(sorted((common or {}).values(), key=lambda frame: frame.dim))
