"""An autoguide built on subsamples, evaluated on the data given.

Pyro's autoguides (``AutoNormal``, ``AutoDelta``, ...) record each plate's size at their first call
and open ``pyro.plate(name, full_size, subsample_size=that size)`` on every later call (unless
built with ``create_plates``). Trained on minibatches of 20 of 100 points, such a guide draws 20
random indices at every call, so on all 100 points its plate disagrees with the model's. Its
parameters of a local latent are nevertheless kept for all ``full_size`` points and indexed by
the plate's subsample. Opening the guide's plate with the model's subsample size on the given
arguments (all 100 indices, or a minibatch of another size; the model replays the guide's
indices) evaluates the same guide, with its own per-point parameters, on the data given.

Evaluations on given data (:func:`~pyro_elbo.kl_gap`, :func:`~pyro_elbo.log_evidence`,
:func:`~pyro_elbo.to_inference_data` and so :func:`~pyro_elbo.loo`, the ``pyro-elbo`` command's
report and export) run inside :func:`plates_of_model`; training does not need it (its minibatches
have the guide's sizes).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide import AutoGuide

from pyro_elbo._pyro._sites import subsample_sites
from pyro_elbo._random import forked_rng


@contextlib.contextmanager
def plates_of_model(model: Any, guide: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[list[str]]:
    """Within the block, an autoguide built on subsamples opens its plates with the model's sizes
    on ``args``; yields one line per plate so resized (empty if none), saying what was evaluated.

    Only a top-level :class:`~pyro.infer.autoguide.AutoGuide` without ``create_plates`` whose
    recorded plate is subsampled, and whose model opens that plate with the same full size but
    another subsample size on ``args``, is changed (through its ``create_plates`` attribute, put
    back on exit). The model runs once from its prior to read its plates (without gradients,
    under :func:`~pyro_elbo._random.forked_rng` and ``poutine.block``).
    """
    recorded = _subsampled_frames(guide)
    sizes = _model_plate_sizes(model, args, kwargs) if recorded else {}
    resized = {
        name: (frame, sizes[name][0])
        for name, frame in recorded.items()
        if name in sizes and sizes[name][1] == frame.full_size and sizes[name][0] != frame.size
    }
    if not resized:
        yield []
        return

    def create_plates(*_: Any, **__: Any) -> list[Any]:
        return [
            pyro.plate(name, frame.full_size, subsample_size=size, dim=frame.dim)
            for name, (frame, size) in resized.items()
        ]

    notes = [
        f"the guide's plate '{name}' was built on subsamples of {frame.size} of {frame.full_size} points; here it "
        f"opens {size} of {frame.full_size} as the model does on these data, with the guide's own per-point "
        "parameters of " + ("every point" if size == frame.full_size else "a random subsample of that size")
        for name, (frame, size) in resized.items()
    ]
    saved = guide.create_plates
    guide.create_plates = create_plates
    try:
        yield notes
    finally:
        guide.create_plates = saved


P = ParamSpec("P")
R = TypeVar("R")


def on_given_data(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn(model, guide, *args, **kwargs)`` run inside :func:`plates_of_model`; of ``kwargs``, those
    that are not ``fn``'s own parameters are the model's."""
    own = set(inspect.signature(fn).parameters)

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        model_kwargs = {key: value for key, value in kwargs.items() if key not in own}
        with plates_of_model(args[0], args[1], tuple(args[2:]), model_kwargs):
            return fn(*args, **kwargs)

    return wrapper


def _subsampled_frames(guide: Any) -> dict[str, Any]:
    """Plate name -> the frame an autoguide recorded at its first call, for its subsampled plates."""
    if not isinstance(guide, AutoGuide) or guide.master is not None or guide.create_plates is not None:
        return {}
    frames = getattr(guide, "_prototype_frames", None) or {}
    return {
        name: frame
        for name, frame in frames.items()
        if frame.full_size not in (None, frame.size) and frame.size not in (None, -1)
    }


def _model_plate_sizes(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Plate name -> (subsample size, full size) of the model's plates on ``args`` (a prior run);
    ``{}`` if the model cannot run from its prior (the caller's own run says why)."""
    with forked_rng(), torch.no_grad(), poutine.block():
        try:
            trace = poutine.trace(model).get_trace(*args, **kwargs)
        except Exception:  # noqa: BLE001 - the evaluation that follows raises it, with its context
            return {}
    sizes = {}
    for name, site in subsample_sites(trace).items():
        value, full = site["value"], getattr(site["fn"], "size", None)
        if isinstance(value, torch.Tensor) and isinstance(full, int):
            sizes[name] = (len(value), full)
    return sizes
