"""Export guide draws to ArviZ.

:func:`to_inference_data` collects plain NumPy groups once (``_collect``) and hands them to the
builder of the installed ArviZ: ``InferenceData`` for ArviZ 0.x, ``DataTree`` through
``arviz.from_dict`` for ArviZ 1.x. Both get the same groups, variables, dims, coords and dtypes
(``tests/test_export_parity.py`` checks both against one expected structure; CI runs the 0.x
builder on Python 3.11 and the 1.x one on the newest Python). Draws are stored as ``chain=1,
draw=S`` so that ArviZ's LOO functions, which expect both dims, work. Log-densities are exported in
float64 whatever the working dtype: ``az.loo`` exponentiates them and float32 overflows to NaN.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pyro_elbo._pyro.draws import Draws, posterior_draws
from pyro_elbo._pyro.inspect import raise_if_nonfinite_observed
from pyro_elbo._pyro.log_weights import guess_max_plate_nesting
from pyro_elbo._pyro.observed_plates import Plate, observed_plates
from pyro_elbo._pyro.untrained import check_trained
from pyro_elbo._typing import Guide, Model

COMBINED = "combined"
"""Name of the one log-likelihood variable of ``log_likelihood="combined"``."""


def to_inference_data(
    model: Model,
    guide: Guide,
    *args: Any,
    num_samples: int = 1000,
    chunk_size: int = 1000,
    coords: dict[str, Any] | None = None,
    dims: dict[str, list[str]] | None = None,
    fit_result: Any = None,
    predictive: bool = True,
    log_likelihood: str = "separate",
    vectorize_particles: bool | str = "auto",
    max_seconds: float = 3600.0,
    **kwargs: Any,
) -> Any:
    """The guide's posterior as an ArviZ object.

    Groups: ``posterior`` (every latent and ``pyro.deterministic`` site, dims ``(chain, draw,
    *site_shape)``), ``posterior_predictive`` (observed sites redrawn from the model for each
    draw), ``log_likelihood`` (pointwise, for ``az.loo``/``az.waic``), ``observed_data``,
    ``sample_stats`` (``log_p``, ``log_q`` and ``log_weight = log_p - log_q`` of each draw, for
    PSIS), and ``fit_history`` (``loss`` and ``step_seconds`` per step) when ``fit_result`` is given.

    Draws are vectorized, ``chunk_size`` at a time, and moved to CPU as they come, so device memory
    stays bounded for large ``num_samples``.

    Args:
        model, guide, *args, **kwargs: as for :func:`~pyro_elbo.fit`; use the full data set.
        num_samples: draws from the guide (``S``).
        coords, dims: ArviZ coordinates and dimension names, e.g.
            ``dims={"theta": ["school"]}, coords={"school": names}``.
        fit_result: a :class:`~pyro_elbo.FitResult` whose history to attach.
        predictive: include the ``posterior_predictive`` group.
        log_likelihood: ``"separate"`` (default): one pointwise log-likelihood per observed site,
            ``log p(x_i | z)`` over that site's batch shape; ``az.loo`` then needs ``var_name`` when
            there are several. ``"combined"``: one variable, ``"combined"``, over the plates that
            every observed site shares (the data plate): for data point ``i``,
            ``sum_sites sum_(other batch dims) log p(x_site,i | z)``, so that ``az.loo(idata)``
            leaves out a whole data point (a sequence with all its time steps, a subject with all
            its responses). Its dims are the shared plates' names unless ``dims`` names
            ``"combined"`` or an observed site's dims cover those plates.
        vectorize_particles: how the draws are made: ``"auto"`` (default; the fastest path the
            model runs on), ``"plate"``, ``"vmap"`` or ``"sequential"`` (``True``/``False`` mean
            ``"plate"``/``"sequential"``), as for the objectives.
        max_seconds: refuse, after the first chunk, an export estimated (that chunk's time times
            the number of chunks) to take longer.

    Returns:
        ``arviz.InferenceData`` (ArviZ 0.x) or ``xarray.DataTree`` (ArviZ 1.x).

    Raises:
        ValueError: if ``num_samples`` or ``chunk_size`` is < 1, the exported arrays of
            ``num_samples`` draws would take more than half the machine's memory (measured on one
            draw, before any are made) or more than ``max_seconds`` (timed on the first chunk),
            ``log_likelihood`` is neither mode, an observed site's data
            holds ``inf``/``nan`` (the site is named), ``"combined"`` is asked of observed sites
            that share no plate, or a plate is subsampled.
    """
    import arviz as az

    if num_samples < 1 or chunk_size < 1:
        raise ValueError(f"num_samples and chunk_size must be >= 1, got {num_samples} and {chunk_size}")
    if log_likelihood not in ("separate", COMBINED):
        raise ValueError(f"log_likelihood must be 'separate' or 'combined', got {log_likelihood!r}")
    check_trained(guide, args, kwargs, caller="to_inference_data")  # warns of an untrained guide
    raise_if_nonfinite_observed(model, guide, args, kwargs, caller="to_inference_data")
    groups = _collect(
        model, guide, args, kwargs, (num_samples, chunk_size, max_seconds), predictive, vectorize_particles
    )
    dims = dict(dims or {})  # a name's dims apply in every group (observed, predictive, log-lik)
    if log_likelihood == COMBINED and groups["log_likelihood"]:
        plates = observed_plates(model, guide, *args, **kwargs)
        separate = groups["log_likelihood"]
        combined, plate_names = _combine(separate, plates)
        groups["log_likelihood"] = {COMBINED: combined}
        batch_ndims = {name: v.ndim - 2 for name, v in separate.items()}
        dims.setdefault(COMBINED, _combined_dims(plates, batch_ndims, dims, plate_names))
    history = None
    if fit_result is not None:
        import xarray as xr

        history = xr.Dataset(
            {
                "loss": ("step", np.asarray(fit_result.history, dtype=float)),
                "step_seconds": ("step", np.asarray(fit_result.step_seconds, dtype=float)),
            },
            coords={"step": np.arange(len(fit_result.history))},
        )
    if int(az.__version__.split(".")[0]) >= 1:
        return _to_datatree(az, groups, coords, dims, history)
    return _to_inference_data_0x(az, groups, coords, dims, history)


def _collect(
    model: Model,
    guide: Guide,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    budget: tuple[int, int, float],
    predictive: bool,
    vectorize_particles: bool | str,
) -> dict[str, dict[str, np.ndarray]]:
    """The export's groups from ``num_samples`` draws, ``chunk_size`` at a time, within ``max_seconds``."""
    num_samples, chunk_size, max_seconds = budget
    max_plate_nesting = guess_max_plate_nesting(model, guide, *args, **kwargs)

    def draw(size: int) -> _CpuDraws:
        return _to_cpu(
            posterior_draws(
                model,
                guide,
                *args,
                num_samples=size,
                max_plate_nesting=max_plate_nesting,
                predictive=predictive,
                vectorize_particles=vectorize_particles,
                **kwargs,
            )
        )

    _check_memory(num_samples, draw(1))  # posterior_draws forks the random stream: the draws below are unchanged
    parts: list[_CpuDraws] = []
    drawn = 0
    while drawn < num_samples:
        size = min(chunk_size, num_samples - drawn)
        start = time.perf_counter()
        parts.append(draw(size))
        drawn += size
        if len(parts) == 1 and drawn < num_samples:
            _check_time(num_samples, chunk_size, time.perf_counter() - start, max_seconds)

    def stack(field: str) -> dict[str, np.ndarray]:
        names = getattr(parts[0], field)
        return {name: np.concatenate([getattr(p, field)[name] for p in parts])[None] for name in names}

    log_p = np.concatenate([p.log_p for p in parts])[None].astype(np.float64)
    log_q = np.concatenate([p.log_q for p in parts])[None].astype(np.float64)
    return {
        "posterior": {**stack("latent"), **stack("deterministic")},
        "posterior_predictive": stack("predictive"),
        "log_likelihood": {k: v.astype(np.float64) for k, v in stack("log_likelihood").items()},
        "observed_data": {name: np.asarray(v) for name, v in parts[0].observed.items()},
        "sample_stats": {"log_p": log_p, "log_q": log_q, "log_weight": log_p - log_q},
    }


def _combine(log_lik: dict[str, np.ndarray], plates: dict[str, tuple[Plate, ...]]) -> tuple[np.ndarray, list[str]]:
    """Sum the observed sites' pointwise log-likelihoods ``[1, S, *batch]`` over every batch dim
    but the plates all sites share; return ``[1, S, *shared plate sizes]`` and those plates' names."""
    names = list(log_lik)
    shared = [p for p in plates.get(names[0], ()) if all(p in plates.get(n, ()) for n in names[1:])]
    if not shared:
        found = "; ".join(f"'{n}' in {[p.name for p in plates.get(n, ())] or 'no plate'}" for n in names)
        raise ValueError(
            f"log_likelihood='combined' needs a plate that every observed site shares ({found}); "
            "use log_likelihood='separate' and az.loo(..., var_name=...)"
        )
    nesting = max([-p.dim for n in names for p in plates.get(n, ())] + [v.ndim - 2 for v in log_lik.values()])
    keep = [nesting + p.dim for p in shared]  # positions among the right-aligned batch dims
    total = np.zeros((1, log_lik[names[0]].shape[1], *(p.size for p in shared)), dtype=np.float64)
    for name in names:
        value = log_lik[name].astype(np.float64)
        batch = value.shape[2:]
        value = value.reshape(value.shape[:2] + (1,) * (nesting - len(batch)) + batch)
        summed = tuple(2 + i for i in range(nesting) if i not in keep)
        total = total + value.sum(axis=summed)  # broadcasts a size-1 shared dim
    return total, [p.name for p in shared]


def _combined_dims(
    plates: dict[str, tuple[Plate, ...]],
    batch_ndims: dict[str, int],
    dims: dict[str, list[str]],
    plate_names: list[str],
) -> list[str]:
    """The combined variable's dims: an observed site's own dims for the shared plates when the
    user named them (e.g. ``dims={"y": ["school"]}``), else the plates' names."""
    for name, ndim in batch_ndims.items():
        given = dims.get(name)
        if given is None or len(given) < ndim:
            continue
        by_plate = {p.name: given[ndim + p.dim] for p in plates.get(name, ()) if ndim + p.dim >= 0}
        if all(n in by_plate for n in plate_names):
            return [by_plate[n] for n in plate_names]
    return list(plate_names)


@dataclass(frozen=True)
class _CpuDraws:
    """:class:`Draws` moved to CPU as NumPy arrays (same fields, same shapes)."""

    latent: dict[str, np.ndarray]
    deterministic: dict[str, np.ndarray]
    log_likelihood: dict[str, np.ndarray]
    predictive: dict[str, np.ndarray]
    observed: dict[str, np.ndarray]
    log_p: np.ndarray
    log_q: np.ndarray


def _machine_memory() -> int:
    """Physical memory in bytes (1 TiB where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**40


def _check_memory(num_samples: int, one: _CpuDraws) -> None:
    """Refuse ``num_samples`` draws whose exported float64 arrays (every latent, deterministic,
    predictive and log-likelihood entry, and ``log_p``/``log_q``/``log_weight``, per draw) would
    take more than half the machine's memory: fail at once instead of swapping or being killed."""
    fields = (one.latent, one.deterministic, one.log_likelihood, one.predictive)
    per_draw = sum(v.size for d in fields for v in d.values()) + 3
    need, memory = 8 * num_samples * per_draw, _machine_memory()
    if need > memory / 2:
        raise ValueError(
            f"to_inference_data(num_samples={num_samples}) would export {need / 2**30:.3g} GiB ({per_draw} "
            f"float64 values per draw), more than half of this machine's {memory / 2**30:.3g} GiB; lower "
            f"num_samples (a few thousand draws are plenty for ArviZ's summaries and LOO), or predictive=False "
            "to leave out the posterior predictive."
        )


def _check_time(num_samples: int, chunk_size: int, seconds: float, max_seconds: float) -> None:
    eta = seconds * math.ceil(num_samples / chunk_size)
    if eta > max_seconds:
        raise ValueError(
            f"to_inference_data(num_samples={num_samples}) would take about {eta / 3600:.3g} h ({seconds:.3g} s "
            f"per chunk of {chunk_size}); lower num_samples (a few thousand draws are plenty for ArviZ's "
            f"summaries and LOO) or raise max_seconds (now {max_seconds:g})."
        )


def _to_cpu(draws: Draws) -> _CpuDraws:
    def cpu(d: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy() for k, v in d.items()}

    return _CpuDraws(
        latent=cpu(draws.latent),
        deterministic=cpu(draws.deterministic),
        log_likelihood=cpu(draws.log_likelihood),
        predictive=cpu(draws.predictive),
        observed=cpu(draws.observed),
        log_p=draws.log_p.detach().cpu().numpy(),
        log_q=draws.log_q.detach().cpu().numpy(),
    )


def _to_inference_data_0x(
    az: Any,
    groups: dict[str, dict[str, np.ndarray]],
    coords: dict[str, Any] | None,
    dims: dict[str, list[str]],
    history: Any,
) -> Any:
    data = az.from_dict(
        posterior=groups["posterior"],
        posterior_predictive=groups["posterior_predictive"] or None,
        log_likelihood=groups["log_likelihood"] or None,
        observed_data=groups["observed_data"] or None,
        sample_stats=groups["sample_stats"],
        coords=coords,
        dims=dims,
    )
    if history is not None:
        with warnings.catch_warnings():  # a group outside ArviZ's schema, by design
            warnings.simplefilter("ignore", UserWarning)
            data.add_groups({"fit_history": history})
    return data


def _to_datatree(
    az: Any,
    groups: dict[str, dict[str, np.ndarray]],
    coords: dict[str, Any] | None,
    dims: dict[str, list[str]],
    history: Any,
) -> Any:
    """ArviZ 1.x: ``from_dict`` takes the groups as one nested dict (exercised by CI's newest-Python
    leg)."""
    tree = az.from_dict({k: v for k, v in groups.items() if v}, coords=coords, dims=dims)
    if history is not None:
        tree["fit_history"] = history
    return tree
