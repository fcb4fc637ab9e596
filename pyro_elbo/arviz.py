"""Export guide draws to ArviZ.

:func:`to_inference_data` collects plain NumPy groups once (``_collect``) and hands them to the
builder of the installed ArviZ: ``InferenceData`` for ArviZ 0.x (Python 3.11), ``DataTree`` through
``arviz.from_dict`` for ArviZ 1.x (Python >= 3.12). Draws are stored as ``chain=1, draw=S`` so that
ArviZ's LOO functions, which expect both dims, work.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from pyro_elbo._typing import Guide, Model
from pyro_elbo.weights import Draws, guess_max_plate_nesting, posterior_draws


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

    Returns:
        ``arviz.InferenceData`` (ArviZ 0.x) or ``xarray.DataTree`` (ArviZ 1.x).
    """
    import arviz as az

    groups = _collect(model, guide, args, kwargs, num_samples, chunk_size, predictive)
    dims = dict(dims or {})  # a name's dims apply in every group (observed, predictive, log-lik)
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
    num_samples: int,
    chunk_size: int,
    predictive: bool,
) -> dict[str, dict[str, np.ndarray]]:
    max_plate_nesting = guess_max_plate_nesting(model, guide, *args, **kwargs)
    parts: list[Draws] = []
    drawn = 0
    while drawn < num_samples:
        size = min(chunk_size, num_samples - drawn)
        draws = posterior_draws(
            model, guide, *args, num_samples=size, max_plate_nesting=max_plate_nesting, predictive=predictive, **kwargs
        )
        parts.append(_to_cpu(draws))
        drawn += size

    def stack(field: str) -> dict[str, np.ndarray]:
        names = getattr(parts[0], field)
        return {name: np.concatenate([getattr(p, field)[name] for p in parts])[None] for name in names}

    log_p = np.concatenate([p.log_p for p in parts])[None]
    log_q = np.concatenate([p.log_q for p in parts])[None]
    return {
        "posterior": {**stack("latent"), **stack("deterministic")},
        "posterior_predictive": stack("predictive"),
        "log_likelihood": stack("log_likelihood"),
        "observed_data": {name: np.asarray(v) for name, v in parts[0].observed.items()},
        "sample_stats": {"log_p": log_p, "log_q": log_q, "log_weight": log_p - log_q},
    }


def _to_cpu(draws: Draws) -> Draws:
    def cpu(d: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {k: v.detach().cpu().numpy() for k, v in d.items()}

    return Draws(
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
    """ArviZ 1.x: ``from_dict`` takes the groups as one nested dict. Not exercised on this
    project's CI (ArviZ 1.x needs Python >= 3.12)."""
    tree = az.from_dict({k: v for k, v in groups.items() if v}, coords=coords, dims=dims)
    if history is not None:
        tree["fit_history"] = history
    return tree
