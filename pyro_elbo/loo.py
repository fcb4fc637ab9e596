"""Leave-one-out cross-validation for a variational posterior.

Draws :math:`\\theta_s \\sim q` are not posterior draws, so the usual PSIS-LOO (``az.loo``) on them
estimates the elpd of q, not of the model. Magnusson, Andersen, Jonasson & Vehtari (2019) correct
for q inside the importance ratios: the leave-one-out ratio of draw s for data point i is

.. math::

    r_{s,i} = \\frac{p(\\theta_s \\mid y_{-i})}{q(\\theta_s)}
      \\propto \\frac{1}{p(y_i \\mid \\theta_s)} \\frac{p(\\theta_s, y)}{q(\\theta_s)},

Pareto-smoothed per data point (PSIS), and
:math:`\\widehat{elpd}_i = \\log \\sum_s \\tilde w_{s,i} p(y_i \\mid \\theta_s)` with the normalized
smoothed weights :math:`\\tilde w`. The k̂ of each point covers both q's error and the leave-one-out
step; the k̂ of :math:`p(\\theta, y) / q(\\theta)` alone says whether q is close enough for any
reweighting (above 0.7 it is not).

The computation follows R's ``loo`` package 2.5 (``loo_approximate_posterior`` with its ``psis``,
``r_eff = 1`` for independent draws) step for step, so that both give the same numbers on the same
arrays: ``tests/test_loo_r.py`` runs R on exported arrays.

References:
    | Bayesian leave-one-out cross-validation for large data (Magnusson et al., 2019)
    | https://arxiv.org/abs/1904.10679
    | Pareto Smoothed Importance Sampling (Vehtari et al., 2024)
    | https://arxiv.org/abs/1507.02646
    | A new and efficient estimation method for the generalized Pareto distribution
    | (Zhang & Stephens, 2009)
"""

from __future__ import annotations

import importlib
import math
import statistics
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

#: k̂ above this: the importance ratios have too heavy a tail for PSIS (R loo's "too high")
KHAT_TOO_HIGH = 0.7

_TO_MAKE_ONE = (
    "make one from a model and its guide with pyro_elbo.to_inference_data(model, guide, *args) "
    "(or call pyro_elbo.loo(model, guide, *args)); for MCMC draws use az.loo"
)


class VariationalLooWarning(UserWarning):
    """The variational LOO is not reliable: q is too far from the posterior, or some data points'
    leave-one-out ratios have too heavy a tail (the k̂ are named)."""


@dataclass(frozen=True)
class VariationalLoo:
    """The numbers of :func:`loo` before they are wrapped in ArviZ's ``ELPDData``.

    Attributes:
        elpd_i, p_i, pareto_k: ``[N]`` pointwise elpd, effective number of parameters and k̂ of
            the corrected leave-one-out ratios.
        mcse_i: ``[N]`` Monte Carlo standard error of each ``elpd_i`` (R loo's ``mcse_elpd``: the
            variance of the log of a normal approximation to the weighted predictive density).
        elpd, se, p_loo: their sums; ``se = sqrt(N var(elpd_i))`` with the sample variance (as R).
        khat_q: k̂ of ``log p(theta, y) - log q(theta)`` alone.
        num_samples: ``S``.
    """

    elpd_i: np.ndarray
    p_i: np.ndarray
    pareto_k: np.ndarray
    mcse_i: np.ndarray
    elpd: float
    se: float
    p_loo: float
    khat_q: float
    num_samples: int


def loo(
    data_or_model: Any,
    *args: Any,
    var_name: str | None = None,
    num_samples: int = 1000,
    **kwargs: Any,
) -> Any:
    """PSIS-LOO of the model, corrected for the guide's draws (Magnusson et al., 2019).

    ``loo(idata)`` takes an export of :func:`~pyro_elbo.to_inference_data` (its
    ``log_likelihood`` group and ``sample_stats`` ``log_p``/``log_q``); ``loo(model, guide,
    *args, num_samples=1000, **kwargs)`` exports ``num_samples`` draws first (with the
    log-likelihood combined over the data plate that the observed sites share, so that a left-out
    point is a whole data point) and takes their LOO.

    For draws :math:`\\theta_s \\sim q` and data point i the log-ratio is
    :math:`-\\log p(y_i \\mid \\theta_s) + \\log p(\\theta_s, y) - \\log q(\\theta_s)`, PSIS-smoothed
    per point; :math:`\\widehat{elpd}_i = \\log \\sum_s \\tilde w_{s,i} p(y_i \\mid \\theta_s)` and
    :math:`p_{loo,i} = \\log \\frac1S \\sum_s p(y_i \\mid \\theta_s) - \\widehat{elpd}_i`. The same
    numbers as R's ``loo::loo_approximate_posterior(log_lik, log_p, log_g)``. A discrete site
    :math:`y` that the guide enumerates is one of the drawn :math:`\\theta_s`, drawn from
    :math:`q(y \\mid x)`, so :math:`\\log q(\\theta_s)` includes :math:`\\log q(y_s \\mid x)`
    (:func:`~pyro_elbo.to_inference_data` says why).

    Args:
        data_or_model: an ``InferenceData`` (ArviZ 0.x) or ``DataTree`` (ArviZ 1.x) export, or
            the model.
        *args: with a model: the guide, then the model's arguments.
        var_name: the ``log_likelihood`` variable; needed when there are several and none is
            ``"combined"``.
        num_samples: with a model: the guide draws ``S``.
        **kwargs: with a model: the model's keyword arguments, and
            :func:`~pyro_elbo.to_inference_data`'s options (``vectorize_particles``, ``dims``,
            ``coords``, ``chunk_size``, ``max_seconds``).

    Returns:
        ArviZ's ``ELPDData`` (pointwise: ``loo_i``/``elpd_i`` and ``pareto_k`` per data point),
        which ``az.compare`` and ``az.plot_khat`` take. Its ``warning`` is true when a pointwise
        k̂ is above ArviZ's ``good_k`` or the k̂ of q alone is above 0.7.

    Warns:
        VariationalLooWarning: when the k̂ of ``log p - log q`` is above 0.7 (q too far from the
            posterior for any reweighting: the estimate is not valid), or some pointwise k̂ are
            above ``good_k`` (those points' estimates are unreliable).

    Raises:
        ValueError: the export has no ``sample_stats`` ``log_p``/``log_q`` (e.g. MCMC draws), no
            ``log_likelihood`` (the model has no observed site), several log-likelihood
            variables and no ``var_name``, or non-finite values.
        TypeError: extra positional arguments with an export.
    """
    if callable(data_or_model):
        if not args:
            raise TypeError("pyro_elbo.loo(model, guide, *args): the guide is missing")
        return _loo_of_model(data_or_model, args[0], args[1:], kwargs, num_samples, var_name)
    if args or kwargs:
        raise TypeError(
            "pyro_elbo.loo(idata) takes no other positional or keyword arguments than var_name; "
            "to export draws first call pyro_elbo.loo(model, guide, *args, num_samples=...)"
        )
    log_lik, log_p, log_q = _arrays(data_or_model, var_name)
    result = variational_loo(log_lik.values.reshape(log_lik.shape[0] * log_lik.shape[1], -1), log_p, log_q)
    _warn(result)
    return _elpd_data(data_or_model, log_lik, log_p, log_q, result)


def variational_loo(log_lik: np.ndarray, log_p: np.ndarray, log_q: np.ndarray) -> VariationalLoo:
    """PSIS-LOO of ``[S, N]`` pointwise log-likelihoods of draws from q with joint densities
    ``log_p`` and ``log_q`` (``[S]``), as R loo 2.5's ``loo_approximate_posterior``.

    Raises:
        ValueError: mismatched shapes or non-finite values (R refuses them too).
    """
    log_lik = np.asarray(log_lik, dtype=np.float64)
    log_p = np.asarray(log_p, dtype=np.float64).reshape(-1)
    log_q = np.asarray(log_q, dtype=np.float64).reshape(-1)
    if log_lik.ndim != 2 or log_p.shape != (log_lik.shape[0],) or log_q.shape != log_p.shape:
        raise ValueError(
            f"log_lik must be [S, N] and log_p, log_q [S]; got {log_lik.shape}, {log_p.shape}, {log_q.shape}"
        )
    for name, value in (("log_lik", log_lik), ("log_p", log_p), ("log_q", log_q)):
        if not np.isfinite(value).all():
            raise ValueError(
                f"{name} holds {int((~np.isfinite(value)).sum())} non-finite values; LOO needs finite ones"
            )
    num = log_lik.shape[0]
    correction = log_p - log_q
    ratios = -log_lik + correction[:, None]
    ratios = ratios - ratios.max(axis=0)
    log_w, pareto_k = psis_smooth(ratios)
    log_w = log_w - _logsumexp(log_w, axis=0)
    elpd_i = _logsumexp(log_lik + log_w, axis=0)
    lpd_i = _logsumexp(log_lik, axis=0) - math.log(num)
    p_i = lpd_i - elpd_i
    khat_q = _khat_of_q(log_p, log_q)
    n_points = elpd_i.size
    se = math.sqrt(n_points * float(np.var(elpd_i, ddof=1))) if n_points > 1 else math.nan
    return VariationalLoo(
        elpd_i=elpd_i,
        p_i=p_i,
        pareto_k=pareto_k,
        mcse_i=_mcse_elpd(log_lik, log_w, elpd_i),
        elpd=float(elpd_i.sum()),
        se=se,
        p_loo=float(p_i.sum()),
        khat_q=khat_q,
        num_samples=num,
    )


def _khat_of_q(log_p: np.ndarray, log_q: np.ndarray) -> float:
    """k̂ of the ratios ``p(theta, y) / q(theta)`` alone (R loo's ``psis_approximate_posterior``
    without log-likelihoods), except for ratios equal up to rounding (``log p - log q`` spread
    within ``64 eps max |log p|, |log q|``): R gives ``inf`` (no tail to fit) or fails to fit
    rounding noise, which would read as "q too far"; here it is ``-inf``, bounded weights (q is the
    posterior up to a constant)."""
    correction = log_p - log_q
    scale = max(float(np.max(np.abs(log_p))), float(np.max(np.abs(log_q))), 1.0)
    if float(np.ptp(correction)) <= 64 * np.finfo(np.float64).eps * scale:
        return -math.inf
    return float(psis_smooth((correction - correction.max())[:, None])[1][0])


def psis_smooth(log_ratios: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pareto-smoothed log-weights and k̂ of each column of ``[S, N]`` log importance ratios, for
    independent draws (``r_eff = 1``), as R loo 2.5's ``psis``.

    Per column: the ``M = ceil(min(S/5, 3 sqrt(S)))`` largest ratios are replaced by the quantiles
    ``F^{-1}((j - 1/2)/M)`` of a generalized Pareto fitted (:func:`gpd_fit`) to their excess over
    the next largest, then every weight is truncated at the largest raw one. ``M < 5``, a tail of
    equal values or a failed fit (k̂ not finite): no smoothing, k̂ = ``inf``.

    Returns:
        ``[S, N]`` unnormalized log-weights and ``[N]`` k̂.
    """
    log_ratios = np.asarray(log_ratios, dtype=np.float64)
    num, points = log_ratios.shape
    tail_len = math.ceil(min(0.2 * num, 3.0 * math.sqrt(num)))
    out = np.empty_like(log_ratios)
    khat = np.full(points, math.inf)
    with np.errstate(all="ignore"):
        for i in range(points):
            column_max = log_ratios[:, i].max()
            lw = log_ratios[:, i] - column_max
            if tail_len >= 5:
                order = np.argsort(lw, kind="stable")
                tail_ids = order[num - tail_len :]
                tail = lw[tail_ids]
                if abs(tail.max() - tail.min()) >= np.finfo(np.float64).eps / 100:
                    cutoff = lw[order[num - tail_len - 1]]
                    k, sigma = gpd_fit(np.exp(tail) - math.exp(cutoff))
                    khat[i] = k
                    if math.isfinite(k):
                        probs = (np.arange(1, tail_len + 1) - 0.5) / tail_len
                        lw[tail_ids] = np.log(_gpd_quantile(probs, k, sigma) + math.exp(cutoff))
            lw[lw > 0] = 0.0
            out[:, i] = lw + column_max
    return out, khat


def gpd_fit(x: np.ndarray) -> tuple[float, float]:
    """Shape ``k`` and scale ``sigma`` of a generalized Pareto fitted to ascending ``x >= 0`` by
    Zhang & Stephens (2009)'s profile-likelihood average over ``30 + floor(sqrt(N))`` grid points
    with their prior 3, then the weakly informative prior ``k <- (N k + 5) / (N + 10)`` (R loo's
    ``gpdfit``). A fit that yields nan gives ``k = inf``."""
    num = x.size
    grid = 30 + math.floor(math.sqrt(num))
    j = np.arange(1, grid + 1)
    x_star = x[math.floor(num / 4 + 0.5) - 1]
    theta = 1.0 / x[-1] + (1.0 - np.sqrt(grid / (j - 0.5))) / 3.0 / x_star
    with np.errstate(all="ignore"):
        k_theta = np.log1p(np.outer(-theta, x)).mean(axis=1)
        log_lik = num * (np.log(-theta / k_theta) - k_theta - 1.0)
        weights = np.exp(log_lik - _logsumexp(log_lik, axis=0))
        theta_hat = float(np.sum(theta * weights))
        k = float(np.mean(np.log1p(-theta_hat * x)))
        sigma = -k / theta_hat
    k = k * num / (num + 10) + 0.5 * 10 / (num + 10)
    return (math.inf if math.isnan(k) else k), sigma


def _mcse_elpd(log_lik: np.ndarray, log_w: np.ndarray, elpd_i: np.ndarray, draws: int = 1000) -> np.ndarray:
    """R loo's ``mcse_elpd`` with ``r_eff = 1``: per point, the variance of the weighted predictive
    density, ``sum_s w_s^2 (p(y_i | theta_s) - exp(elpd_i))^2``, taken to the log scale through
    ``draws`` normal quantiles (Blom's plotting positions)."""
    normal = statistics.NormalDist()
    z = np.array([normal.inv_cdf((r - 3 / 8) / (draws - 2 * 3 / 8 + 1)) for r in range(1, draws + 1)])
    out = np.empty(elpd_i.shape)
    with np.errstate(all="ignore"):
        variance = np.sum(np.exp(log_w) ** 2 * (np.exp(log_lik) - np.exp(elpd_i)) ** 2, axis=0)
        for i, (mean, var) in enumerate(zip(np.exp(elpd_i), variance, strict=True)):
            values = mean + math.sqrt(var) * z
            out[i] = math.sqrt(float(np.var(np.log(values[values > 0]), ddof=1)))
    return out


def _gpd_quantile(probs: np.ndarray, k: float, sigma: float) -> np.ndarray:
    if math.isnan(sigma) or sigma <= 0:
        return np.full(probs.shape, math.nan)
    return np.asarray(sigma * np.expm1(-k * np.log1p(-probs)) / k)


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    """``log sum exp`` along ``axis``: nan if any value is nan, ``-inf`` if all are."""
    top = np.max(x, axis=axis, keepdims=True)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(all="ignore"):
        out = np.log(np.sum(np.exp(x - safe), axis=axis, keepdims=True)) + safe
    return np.asarray(np.squeeze(out, axis=axis))


def report_text(data: Any, var_name: str | None = None) -> str:
    """A few lines on the variational LOO of an export: elpd, its SE and p_loo, the k̂ of q alone
    and a summary of the pointwise k̂, and whether the estimate is valid (the warnings of
    :func:`loo` become lines here)."""
    log_lik, log_p, log_q = _arrays(data, var_name)
    result = variational_loo(log_lik.values.reshape(log_lik.shape[0] * log_lik.shape[1], -1), log_p, log_q)
    good_k = _good_k(result.num_samples)
    k = result.pareto_k
    lines = [
        f"PSIS-LOO corrected for the guide (Magnusson et al. 2019; {result.num_samples} draws, "
        f"{k.size} data points of '{log_lik.name}'):",
        f"  elpd_loo {result.elpd:.2f} (SE {result.se:.2f}), p_loo {result.p_loo:.2f}",
        f"  Pareto k-hat: of log p - log q {result.khat_q:.2f}; per data point: {int((k <= 0.5).sum())} good "
        f"(<= 0.5), {int(((k > 0.5) & (k <= good_k)).sum())} ok (<= {good_k:.2f}), {int((k > good_k).sum())} "
        f"bad, largest {float(np.max(k)):.2f}",
    ]
    if result.khat_q > KHAT_TOO_HIGH:
        lines.append(
            f"  NOT VALID: the guide is too far from the posterior (k-hat of log p - log q > {KHAT_TOO_HIGH}); "
            "no reweighting of its draws recovers the posterior"
        )
    elif (k > good_k).any():
        lines.append(f"  unreliable for the {int((k > good_k).sum())} data points with k-hat > {good_k:.2f}")
    return "\n".join(lines)


def _good_k(num_samples: int) -> float:
    """ArviZ's threshold ``min(1 - 1/log10(S), 0.7)`` for a pointwise k̂."""
    return min(1.0 - 1.0 / math.log10(num_samples), KHAT_TOO_HIGH)


def _warn(result: VariationalLoo) -> None:
    """One warning: q too far (whatever the pointwise k̂), else the points with k̂ above good_k."""
    good_k = _good_k(result.num_samples)
    bad = int((result.pareto_k > good_k).sum())
    points = (
        f"{bad} of {result.pareto_k.size} data points have a Pareto k-hat above {good_k:.2f} (largest "
        f"{float(np.max(result.pareto_k)):.2f})"
    )
    if result.khat_q > KHAT_TOO_HIGH:
        warnings.warn(
            f"the guide is too far from the posterior for the LOO correction: k-hat of log p - log q is "
            f"{result.khat_q:.2f} > {KHAT_TOO_HIGH} (a guide narrower than the posterior, typically), and "
            f"{points}; this elpd is not valid. Train a better guide (e.g. IWAE or a wider family) and "
            "check it with pyro_elbo.kl_gap",
            VariationalLooWarning,
            stacklevel=3,
        )
    elif bad:
        warnings.warn(f"{points}: their leave-one-out estimates are unreliable", VariationalLooWarning, stacklevel=3)


def _group(data: Any, name: str) -> Any:
    """A group of an ``InferenceData`` or ``DataTree`` as an ``xarray.Dataset``, or ``None``."""
    if hasattr(data, "children"):  # xarray.DataTree (ArviZ 1.x)
        return data[name].to_dataset() if name in data.children else None
    groups = data.groups() if callable(getattr(data, "groups", None)) else []
    return getattr(data, name) if name in groups else None


def _arrays(data: Any, var_name: str | None) -> tuple[Any, np.ndarray, np.ndarray]:
    """The ``(chain, draw, *points)`` log-likelihood DataArray and the ``[S]`` log_p, log_q."""
    if not hasattr(data, "children") and not callable(getattr(data, "groups", None)):
        raise TypeError(
            f"pyro_elbo.loo takes an InferenceData/DataTree or a model and guide, got {type(data).__name__}"
        )
    stats = _group(data, "sample_stats")
    missing = [n for n in ("log_p", "log_q") if stats is None or n not in stats.data_vars]
    if missing:
        raise ValueError(
            f"this data has no sample_stats {' and '.join(missing)}: the variational LOO needs the joint "
            f"log-densities log p(theta, y) and log q(theta) of each draw; {_TO_MAKE_ONE}"
        )
    if stats.attrs.get("draws") == "psis":
        raise ValueError(
            "this export holds draws resampled by importance weights (to_inference_data(draws='psis')); the "
            "variational LOO corrects the guide's own draws: export with draws='guide' (the default)"
        )
    group = _group(data, "log_likelihood")
    if group is None or not group.data_vars:
        raise ValueError(
            "this data has no log_likelihood group: the model has no observed site, so there is no data "
            "point to leave out (LOO needs pyro.sample(..., obs=...))"
        )
    names = list(group.data_vars)
    if var_name is None:
        if len(names) > 1 and "combined" not in names:
            raise ValueError(
                f"several log-likelihood variables {names}: pass var_name=..., or export with "
                "to_inference_data(..., log_likelihood='combined') to leave out whole data points"
            )
        var_name = "combined" if "combined" in names else names[0]
    if var_name not in names:
        raise ValueError(f"no log-likelihood variable {var_name!r}; the data has {names}")
    log_lik = group[var_name].transpose("chain", "draw", ...)
    sample = int(log_lik.shape[0] * log_lik.shape[1])

    def flat(name: str) -> np.ndarray:
        value = stats[name].transpose("chain", "draw").values.reshape(-1)
        if value.shape != (sample,):
            raise ValueError(f"sample_stats {name} has {value.size} draws, the log-likelihood {sample}")
        return np.asarray(value, dtype=np.float64)

    return log_lik, flat("log_p"), flat("log_q")


def _elpd_data(data: Any, log_lik: Any, log_p: np.ndarray, log_q: np.ndarray, result: VariationalLoo) -> Any:
    """ArviZ's ``ELPDData`` of the installed ArviZ holding ``result``."""
    import arviz as az
    import xarray as xr

    template = log_lik.isel(chain=0, draw=0, drop=True)

    def pointwise(values: np.ndarray, name: str) -> Any:
        return xr.DataArray(values.reshape(template.shape), dims=template.dims, coords=template.coords, name=name)

    good_k = _good_k(result.num_samples)
    warning = bool((result.pareto_k > good_k).any() or result.khat_q > KHAT_TOO_HIGH)
    if int(az.__version__.split(".")[0]) >= 1:
        arviz_stats: Any = importlib.import_module("arviz_stats")  # ArviZ 1.x's statistics

        loo_class = getattr(importlib.import_module("arviz_stats.utils"), "ELPDDataLOO", None)
        if loo_class is not None:  # built from these numbers (arviz_stats's own PSIS refuses < 25 draws)
            return loo_class(
                elpd=result.elpd,
                se=result.se,
                p=result.p_loo,
                n_samples=result.num_samples,
                n_data_points=result.elpd_i.size,
                scale="log",
                warning=warning,
                good_k=good_k,
                elpd_i=pointwise(result.elpd_i, str(log_lik.name)),
                pareto_k=pointwise(result.pareto_k, "pareto_shape"),
                approx_posterior=True,
            )
        dims = ("chain", "draw")
        shape = log_lik.shape[:2]
        with warnings.catch_warnings():  # its own PSIS warns; the numbers are replaced below
            warnings.simplefilter("ignore")
            elpd = arviz_stats.loo_approximate_posterior(
                data,
                log_p=xr.DataArray(log_p.reshape(shape), dims=dims, coords={d: log_lik[d] for d in dims}),
                log_q=xr.DataArray(log_q.reshape(shape), dims=dims, coords={d: log_lik[d] for d in dims}),
                pointwise=True,
                var_name=str(log_lik.name),
            )
        elpd.elpd, elpd.se, elpd.p = result.elpd, result.se, result.p_loo
        elpd.elpd_i = pointwise(result.elpd_i, str(log_lik.name))
        elpd.pareto_k = pointwise(result.pareto_k, "pareto_shape")
        elpd.warning, elpd.good_k = warning, good_k
        return elpd
    return az.ELPDData(
        data=[
            result.elpd,
            result.se,
            result.p_loo,
            result.num_samples,
            result.elpd_i.size,
            warning,
            pointwise(result.elpd_i, "loo_i"),
            pointwise(result.pareto_k, "pareto_shape"),
            "log",
            good_k,
        ],
        index=[
            "elpd_loo",
            "se",
            "p_loo",
            "n_samples",
            "n_data_points",
            "warning",
            "loo_i",
            "pareto_k",
            "scale",
            "good_k",
        ],
    )


def _loo_of_model(
    model: Any, guide: Any, args: tuple[Any, ...], kwargs: dict[str, Any], num_samples: int, var_name: str | None
) -> Any:
    from pyro_elbo.arviz import to_inference_data

    options = {
        k: kwargs.pop(k) for k in ("vectorize_particles", "dims", "coords", "chunk_size", "max_seconds") if k in kwargs
    }
    idata = to_inference_data(
        model, guide, *args, num_samples=num_samples, predictive=False, log_likelihood="auto", **options, **kwargs
    )
    log_lik, log_p, log_q = _arrays(idata, var_name)
    result = variational_loo(log_lik.values.reshape(log_lik.shape[0] * log_lik.shape[1], -1), log_p, log_q)
    _warn(result)
    return _elpd_data(idata, log_lik, log_p, log_q, result)


__all__ = [
    "KHAT_TOO_HIGH",
    "VariationalLoo",
    "VariationalLooWarning",
    "gpd_fit",
    "loo",
    "psis_smooth",
    "report_text",
    "variational_loo",
]
