"""Export guide draws to ArviZ.

:func:`to_inference_data` collects plain NumPy groups once (``_collect``) and hands them to the
builder of the installed ArviZ: ``InferenceData`` for ArviZ 0.x, ``DataTree`` through
``arviz.from_dict`` for ArviZ 1.x. Both get the same groups, variables, dims, coords and dtypes
(``tests/test_export_parity.py`` checks both against one expected structure; CI runs the 0.x
builder on Python 3.11 and the 1.x one on the newest Python). The independent draws are stored
as ``num_chains`` chains of ``S / num_chains`` draws (4 by default), so that ArviZ's LOO functions,
which expect both dims, work and ``az.summary``'s ``r_hat`` is a number (close to 1, as for any
independent draws: it says nothing about q's error). Log-densities are exported in
float64 whatever the working dtype: ``az.loo`` exponentiates them and float32 overflows to NaN.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pyro_elbo._pyro.draws import Draws, posterior_draws
from pyro_elbo._pyro.guide_plates import on_given_data
from pyro_elbo._pyro.inspect import raise_if_nonfinite_observed
from pyro_elbo._pyro.log_weights import guess_max_plate_nesting
from pyro_elbo._pyro.observed_plates import Plate, observed_plates
from pyro_elbo._pyro.untrained import check_trained
from pyro_elbo._typing import Guide, Model

COMBINED = "combined"
"""Name of the one log-likelihood variable of ``log_likelihood="combined"``."""


@on_given_data  # an autoguide built on subsamples: its plates opened as the model's on these data
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
    log_likelihood: str = "auto",
    vectorize_particles: bool | str = "auto",
    max_seconds: float = 3600.0,
    num_chains: int = 4,
    draws: str = "guide",
    **kwargs: Any,
) -> Any:
    """The guide's posterior as an ArviZ object.

    Groups: ``posterior`` (every latent and ``pyro.deterministic`` site, dims ``(chain, draw,
    *site_shape)``), ``posterior_predictive`` (observed sites redrawn from the model for each
    draw), ``log_likelihood`` (pointwise: ``az.loo``/``az.waic`` on the guide's draws estimate q's
    elpd, :func:`~pyro_elbo.loo` corrects it for q), ``observed_data``,
    ``sample_stats`` (``log_p``, ``log_q`` and ``log_weight = log_p - log_q`` of each draw, for
    PSIS), and ``fit_history`` (``loss`` and ``step_seconds`` per step) when ``fit_result`` is given.

    Every site as what it is: a site rewritten by ``poutine.reparam`` (e.g. ``LocScaleReparam``,
    which Pyro records as an observed ``Delta``) is a latent, in ``posterior`` with its auxiliary
    ``_decentered`` site; a ``pyro.factor`` term is part of ``log_p`` but not an observation, so it
    is in neither ``log_likelihood`` nor ``observed_data``. The model's enumerated discrete sites are drawn
    from their exact posterior given each draw (Pyro's ``infer_discrete``); where that fails on a
    model, they are left out with a warning and the observed sites' log-likelihood is still the
    marginal over them.

    A guide that enumerates a discrete site :math:`y` (``config_enumerate`` on the guide, which
    ``TraceEnum_ELBO`` sums out, as in Pyro's semi-supervised VAE and scANVI) is exported as the
    same guide with :math:`y` sampled: each draw is :math:`y_s \\sim q(y \\mid x)` from the guide's
    own distribution, then the other guide sites given it as the guide draws them,
    :math:`z_s \\sim q(z \\mid x, y_s)`. Every group speaks of the one joint
    :math:`q(y, z) = q(y \\mid x)\\, q(z \\mid x, y)`: ``posterior`` holds :math:`y_s` with the other
    latents, ``log_likelihood`` holds :math:`\\log p(x_i \\mid y_s, z_s)`, and ``sample_stats``
    holds :math:`\\log p(x, y_s, z_s)` and :math:`\\log q(y_s \\mid x) + \\log q(z_s \\mid x, y_s)`.
    So :math:`\\log p - \\log q` is the importance weight of the draw :math:`(y_s, z_s)`:
    :func:`~pyro_elbo.loo`'s ratios :math:`p(x, y_s, z_s) / (q(y_s, z_s)\\, p(x_i \\mid y_s, z_s))`
    and ``draws="psis"`` reweight the labels together with the other latents. The exact sum over
    :math:`y` that ``log_evidence`` and ``kl_gap`` use, :math:`\\sum_y p(x, y, z_y) / q(z_y \\mid x, y)`,
    is the weight of a tuple :math:`(z_y)_y` (one :math:`z` per label), not of one draw
    :math:`(y, z)`; it would leave the exported labels out of the weights, so it is not used here.
    (``tests/test_guide_enumeration.py`` checks the exported labels' frequencies against
    :math:`q(y \\mid x)` and the corrected LOO against that of the guide without ``config_enumerate``.)

    An observed site's ``posterior_predictive`` is a replicate of its data; a distribution whose
    draws do not have the data's shape (Pyro's ``MissingDataDiscreteHMM`` of the MuE models, whose
    event shape ``(1, K)`` stands for a sequence of any length) draws no replicate, and the site is
    left out of that group with a warning (its other groups are exported).

    Draws are vectorized, ``chunk_size`` at a time, and moved to CPU as they come, so device memory
    stays bounded for large ``num_samples``.

    Args:
        model, guide, *args, **kwargs: as for :func:`~pyro_elbo.fit`; use the full data set.
        num_samples: draws from the guide (``S``).
        coords, dims: ArviZ coordinates and dimension names, e.g.
            ``dims={"theta": ["school"]}, coords={"school": names}``.
        fit_result: a :class:`~pyro_elbo.FitResult` whose history to attach.
        predictive: include the ``posterior_predictive`` group.
        log_likelihood: ``"auto"`` (default): ``"combined"`` when there are several observed sites
            and they share a plate (a data point is then left out with all its sites, which is
            what ``az.loo(idata)`` and :func:`~pyro_elbo.loo` compute), else ``"separate"``.
            ``"separate"``: one pointwise log-likelihood per observed site,
            ``log p(x_i | z)`` over that site's batch shape; ``az.loo`` then needs ``var_name`` when
            there are several. ``"combined"``: one variable, ``"combined"``, over the plates that
            every observed site shares (the data plate): for data point ``i``,
            ``sum_sites sum_(other batch dims) log p(x_site,i | z)``, so that ``az.loo(idata)``
            leaves out a whole data point (a sequence with all its time steps, a subject with all
            its responses). Its dims are the shared plates' names unless ``dims`` names
            ``"combined"`` or an observed site's dims cover those plates.
        vectorize_particles: how the draws are made: ``"auto"`` (default; the fastest path the
            model runs on), ``"plate"``, ``"vmap"`` or ``"sequential"`` (``True``/``False`` mean
            ``"plate"``/``"sequential"``), as for the objectives. With ``"auto"``, draws that
            fail on the path the objectives take (a value that mixes the particles with its own
            dims, a predictive draw that cannot be batched) are made one particle at a time, with
            a :class:`~pyro_elbo.ParticlePathWarning`.
        draws: ``"guide"`` (default): the guide's own independent draws, ``theta_s ~ q``, with
            ``log_p``/``log_q`` in ``sample_stats``. They stand for q, not for the posterior:
            ArviZ's summaries and ``az.loo`` on them describe q (the worse q, the further off);
            :func:`~pyro_elbo.loo` corrects LOO for q and needs these draws, which is why they
            are the default. ``"psis"``: ``num_samples`` draws resampled with replacement
            (sampling-importance-resampling) by the Pareto-smoothed importance weights
            ``p(theta, y) / q(theta)`` of the guide's draws: closer to the posterior where the
            k-hat of those weights is below 0.7 (warns above it: no reweighting of q's draws
            then stands for the posterior), but with repeats (ArviZ's ESS counts them as
            distinct), and not for :func:`~pyro_elbo.loo`. Either way the file's
            ``sample_stats`` attributes hold ``draws`` and ``psis_khat`` (the k-hat of
            ``log p - log q``).
        num_chains: the draws are split into this many chains (dim ``chain``) of
            ``num_samples / num_chains`` draws; when ``num_samples`` is not a multiple, into the
            largest number of chains up to ``num_chains`` that divides it. The draws are
            independent whatever the split.
        max_seconds: refuse, after the first chunk, an export estimated (that chunk's time times
            the number of chunks) to take longer.

    Returns:
        ``arviz.InferenceData`` (ArviZ 0.x) or ``xarray.DataTree`` (ArviZ 1.x).

    Warns:
        UserWarning: an observed site the model draws no replicate of (named, with the shapes),
            left out of ``posterior_predictive``.
        ParticlePathWarning: with ``vectorize_particles="auto"``, the draws are made one particle
            at a time (the path and its error named).

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
    if isinstance(num_chains, bool) or not isinstance(num_chains, int) or num_chains < 1:
        raise ValueError(f"num_chains must be an int >= 1, got {num_chains!r}")
    if log_likelihood not in ("separate", COMBINED, "auto"):
        raise ValueError(f"log_likelihood must be 'separate', 'combined' or 'auto', got {log_likelihood!r}")
    check_trained(guide, args, kwargs, caller="to_inference_data")  # warns of an untrained guide
    raise_if_nonfinite_observed(model, guide, args, kwargs, caller="to_inference_data")
    if draws not in ("guide", "psis"):
        raise ValueError(f"draws must be 'guide' or 'psis', got {draws!r}")
    groups = _collect(
        model, guide, args, kwargs, (num_samples, chunk_size, max_seconds), predictive, vectorize_particles
    )
    khat = _khat_and_resample(groups, draws)
    chains = max(c for c in range(1, num_chains + 1) if num_samples % c == 0)
    groups = {
        group: (values if group == "observed_data" else {k: _as_chains(v, chains) for k, v in values.items()})
        for group, values in groups.items()
    }
    dims = dict(dims or {})  # a name's dims apply in every group (observed, predictive, log-lik)
    if log_likelihood == "auto":
        log_likelihood = _auto_log_likelihood(model, guide, args, kwargs, groups["log_likelihood"])
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
    attrs = {"draws": draws, "psis_khat": khat}
    if int(az.__version__.split(".")[0]) >= 1:
        tree = _to_datatree(az, groups, coords, dims, history)
        tree["sample_stats"].attrs.update(attrs)
        return tree
    data = _to_inference_data_0x(az, groups, coords, dims, history)
    data.sample_stats.attrs.update(attrs)
    return data


def _khat_and_resample(groups: dict[str, dict[str, np.ndarray]], draws: str) -> float:
    """The k-hat of ``log p - log q`` of the guide's draws (as R loo's PSIS); for
    ``draws="psis"``, every per-draw array in ``groups`` replaced in place by ``S`` draws resampled
    with replacement by the smoothed weights (torch's generator: ``pyro.set_rng_seed`` repeats
    them), with a warning when k-hat > 0.7."""
    from pyro_elbo.loo import KHAT_TOO_HIGH, psis_smooth

    log_w = groups["sample_stats"]["log_weight"].reshape(-1)
    if not np.isfinite(log_w).all():
        return math.nan
    smoothed, khat = psis_smooth((log_w - log_w.max())[:, None])
    if draws == "guide":
        return float(khat[0])
    if khat[0] > KHAT_TOO_HIGH:
        warnings.warn(
            f"to_inference_data(draws='psis'): the k-hat of the guide's importance weights is {khat[0]:.2f} > "
            f"{KHAT_TOO_HIGH}: the guide is too far from the posterior for its resampled draws to stand for it "
            "(train a better guide; pyro_elbo.kl_gap measures how far)",
            UserWarning,
            stacklevel=3,
        )
    probs = torch.as_tensor(np.exp(smoothed[:, 0] - smoothed[:, 0].max()))
    index = torch.multinomial(probs, log_w.size, replacement=True).numpy()
    for group, values in groups.items():
        if group != "observed_data":
            groups[group] = {name: value[:, index] for name, value in values.items()}
    return float(khat[0])


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

    for name, why in parts[0].no_replicate.items():
        warnings.warn(
            f"to_inference_data: no posterior predictive for observed site '{name}': {why}, so no draw of "
            "the model is a replicate of the data (the other groups hold the site)",
            UserWarning,
            stacklevel=3,
        )
    log_p = np.concatenate([p.log_p for p in parts])[None].astype(np.float64)
    log_q = np.concatenate([p.log_q for p in parts])[None].astype(np.float64)
    return {
        "posterior": {**stack("latent"), **stack("deterministic")},
        "posterior_predictive": stack("predictive"),
        "log_likelihood": {k: v.astype(np.float64) for k, v in stack("log_likelihood").items()},
        "observed_data": {name: np.asarray(v) for name, v in parts[0].observed.items()},
        "sample_stats": {"log_p": log_p, "log_q": log_q, "log_weight": log_p - log_q},
    }


def _as_chains(value: np.ndarray, chains: int) -> np.ndarray:
    """``[1, S, *shape]`` -> ``[chains, S / chains, *shape]`` (consecutive draws per chain)."""
    return value.reshape(chains, value.shape[1] // chains, *value.shape[2:])


def _auto_log_likelihood(
    model: Model, guide: Guide, args: tuple[Any, ...], kwargs: dict[str, Any], log_lik: dict[str, np.ndarray]
) -> str:
    """``"combined"`` for several observed sites that share a plate (a left-out data point is then
    all of its sites), else ``"separate"``."""
    if len(log_lik) < 2:
        return "separate"
    plates = observed_plates(model, guide, *args, **kwargs)
    names = list(log_lik)
    shared = [p for p in plates.get(names[0], ()) if all(p in plates.get(n, ()) for n in names[1:])]
    return COMBINED if shared else "separate"


def _combine(log_lik: dict[str, np.ndarray], plates: dict[str, tuple[Plate, ...]]) -> tuple[np.ndarray, list[str]]:
    """Sum the observed sites' pointwise log-likelihoods ``[C, S/C, *batch]`` over every batch dim
    but the plates all sites share; return ``[C, S/C, *shared plate sizes]`` and those plates' names."""
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
    total = np.zeros((*log_lik[names[0]].shape[:2], *(p.size for p in shared)), dtype=np.float64)
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
    no_replicate: dict[str, str]


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
        no_replicate=draws.no_replicate,
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
    leg). A DataTree refuses ``/`` in names (``pyro.contrib.autoname.scope``'s site names) as
    netCDF does: they are renamed as :func:`to_netcdf` renames them, with the same warning and
    record."""
    renames = _safe_names({n for variables in groups.values() for n in variables} | set(dims))
    if renames:
        _warn_renames(renames)
        groups = {g: {renames.get(n, n): v for n, v in variables.items()} for g, variables in groups.items()}
        dims = {renames.get(n, n): d for n, d in dims.items()}
    tree = az.from_dict({k: v for k, v in groups.items() if v}, coords=coords, dims=dims)
    for group, variables in groups.items():
        here = {site: name for site, name in renames.items() if name in variables}
        if here and variables:
            tree[group].attrs["pyro_elbo_renamed"] = json.dumps({b: a for a, b in here.items()})
    if history is not None:
        tree["fit_history"] = history
    return tree


#: the characters netCDF (HDF5) refuses in variable and dimension names, and their safe form
_NETCDF_REFUSED = {"/": "."}


class NetCDFRenameWarning(UserWarning):
    """Site names netCDF refuses (``/`` of ``pyro.contrib.autoname.scope``) were renamed in the file."""


def to_netcdf(data: Any, path: str | os.PathLike[str]) -> dict[str, str]:
    """Write an export of :func:`to_inference_data` to a netCDF file.

    netCDF refuses ``/`` in variable and dimension names (HDF5's group separator), which
    ``pyro.contrib.autoname.scope`` puts in site names (``"mixture/locs"``). Such names are written
    with ``.`` instead (``"mixture.locs"``, with a trailing ``_`` while that clashes with another
    name), with a :class:`NetCDFRenameWarning` naming the renames; every renamed group records them
    in its attribute ``pyro_elbo_renamed`` (JSON, file name -> site name). A write that fails leaves
    no partial file behind.

    Returns:
        The renames, site name -> name in the file (empty if none).
    """
    names: set[str] = set()

    def collect(ds: Any) -> Any:
        names.update(str(n) for n in (*ds.variables, *ds.dims))
        return ds

    _map_groups(data, collect)
    renames = _safe_names(names)
    if renames:
        _warn_renames(renames)

        def rename(ds: Any) -> Any:
            here = {a: b for a, b in renames.items() if a in ds.variables or a in ds.dims}
            if not here:
                return ds
            ds = ds.rename(here)
            ds.attrs["pyro_elbo_renamed"] = json.dumps({b: a for a, b in here.items()})
            return ds

        data = _map_groups(data, rename)
    try:
        data.to_netcdf(os.fspath(path))
    except BaseException:
        if os.path.exists(path):
            os.remove(path)
        raise
    return renames


def _safe_names(names: set[str]) -> dict[str, str]:
    """Each name netCDF (and a DataTree) refuses -> its safe form, unique among ``names``."""
    renames: dict[str, str] = {}
    for name in sorted(names):
        if any(c in name for c in _NETCDF_REFUSED):
            safe = "".join(_NETCDF_REFUSED.get(c, c) for c in name)
            while safe in names or safe in renames.values():
                safe += "_"
            renames[name] = safe
    return renames


def _warn_renames(renames: dict[str, str]) -> None:
    warnings.warn(
        f"netCDF refuses '/' in names; written as: {', '.join(f'{a!r} -> {b!r}' for a, b in renames.items())} "
        "(recorded in each group's attribute 'pyro_elbo_renamed')",
        NetCDFRenameWarning,
        stacklevel=3,
    )


def _map_groups(data: Any, fn: Any) -> Any:
    """``fn`` applied to every group's Dataset: a new export (ArviZ 1.x DataTree or 0.x InferenceData)."""
    if hasattr(data, "map_over_datasets"):
        return data.map_over_datasets(fn)
    return data.map(fn, inplace=False)
