"""pyro_elbo.loo: PSIS-LOO from guide draws corrected for q, against the exact LOO of a conjugate
model, ArviZ's ELPDData (az.compare, az.plot_khat), the too-narrow guide, and refusals."""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy.stats import norm

import pyro_elbo
from pyro_elbo.loo import VariationalLooWarning, variational_loo

if os.environ.get("PYRO_ELBO_REQUIRE_ALL_DEPS"):
    import arviz as az  # must be installed: fail, never skip
else:
    az = pytest.importorskip("arviz")

ARVIZ_MAJOR = int(az.__version__.split(".")[0])
N = 30
Y = torch.tensor(np.random.default_rng(0).normal(1.0, 1.0, N))
POST_VAR = 1.0 / (1.0 + N)  # y_i ~ N(mu, 1), mu ~ N(0, 1)
POST_MEAN = float(Y.sum()) * POST_VAR


def model(y: torch.Tensor) -> None:
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=y)


def guide_scaled(scale: float):  # noqa: ANN201
    """The exact posterior of ``mu`` with its SD times ``scale``."""

    def guide(y: torch.Tensor) -> None:
        pyro.sample("mu", dist.Normal(torch.tensor(POST_MEAN, dtype=y.dtype), scale * math.sqrt(POST_VAR)))

    return guide


def exact_loo() -> float:
    """sum_i log p(y_i | y_-i): mu | y_-i ~ N(sum(y_-i) / N, 1 / N), y_i | y_-i ~ N(that, 1 + 1 / N)."""
    y = Y.numpy()
    mean = (y.sum() - y) / N
    return float(norm.logpdf(y, mean, math.sqrt(1.0 + 1.0 / N)).sum())


def elpd(result) -> float:  # noqa: ANN001
    return float(result.elpd_loo if hasattr(result, "elpd_loo") else result.elpd)


def from_dict(groups: dict[str, dict[str, np.ndarray]]):  # noqa: ANN201
    """``InferenceData`` (ArviZ 0.x) or ``DataTree`` (1.x) of these groups."""
    return az.from_dict(**groups) if ARVIZ_MAJOR < 1 else az.from_dict(groups)


def grid_arrays(scale: float, num: int = 4000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draws of ``guide_scaled(scale)`` at the ``num`` quantiles ``(j - 1/2) / num``: no randomness."""
    sd = scale * math.sqrt(POST_VAR)
    mu = POST_MEAN + sd * norm.ppf((np.arange(num) + 0.5) / num)
    log_lik = norm.logpdf(Y.numpy()[None, :], mu[:, None], 1.0)
    log_p = norm.logpdf(mu, 0.0, 1.0) + log_lik.sum(1)
    return log_lik, log_p, norm.logpdf(mu, POST_MEAN, sd)


def test_corrected_loo_of_a_too_wide_guide_is_the_exact_loo() -> None:
    """A guide twice as wide as the posterior: the corrected elpd is within 4.89 x (sum of the
    pointwise Monte Carlo SEs; their errors share the draws, so the sum bounds the SD of the
    total) of the exact LOO (false alarm 1e-6), while plain PSIS-LOO of the draws is further off
    than that bound (the test tells the two apart)."""
    pyro.set_rng_seed(0)
    idata = pyro_elbo.to_inference_data(model, guide_scaled(2.0), Y, num_samples=4000, predictive=False)
    log_lik = idata.log_likelihood["obs"].values.reshape(4000, N)
    stats = idata.sample_stats
    result = variational_loo(log_lik, stats["log_p"].values.reshape(-1), stats["log_q"].values.reshape(-1))
    bound = 4.89 * float(result.mcse_i.sum())
    assert abs(result.elpd - exact_loo()) <= bound, (result.elpd, exact_loo(), bound)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ's own k-hat notes
        plain = elpd(az.loo(idata))
    assert abs(plain - exact_loo()) > bound, (plain, exact_loo(), bound)
    assert elpd(pyro_elbo.loo(idata)) == pytest.approx(result.elpd, rel=1e-12)
    assert result.khat_q < 0.5


def test_elpd_data_is_what_arviz_takes() -> None:
    import matplotlib

    matplotlib.use("Agg")
    pyro.set_rng_seed(1)
    first = pyro_elbo.loo(model, guide_scaled(1.2), Y, num_samples=1000)
    second = pyro_elbo.loo(model, guide_scaled(1.5), Y, num_samples=1000)
    assert not first.warning
    pointwise = first.loo_i if ARVIZ_MAJOR < 1 else first.elpd_i
    assert pointwise.shape == (N,) and first.pareto_k.shape == (N,)
    assert float(pointwise.sum()) == pytest.approx(elpd(first), rel=1e-12)
    table = az.compare({"a": first, "b": second})
    assert set(table.index) == {"a", "b"}
    if hasattr(az, "plot_khat"):  # ArviZ 0.x; arviz-plots' on 1.x
        az.plot_khat(first)
        matplotlib.pyplot.close("all")


def test_too_narrow_guide_warns_and_is_flagged() -> None:
    """Scale 0.25: the weights p/q have tail index 1 - 0.25^2 ~ 0.94; on the quantile grid (no
    randomness) k-hat of log p - log q is above 0.7 and the result says it is not valid."""
    result = variational_loo(*grid_arrays(0.25))
    assert result.khat_q > 0.7
    log_lik, log_p, log_q = grid_arrays(0.25)
    idata = from_dict(
        {
            "posterior": {"mu": np.zeros((4, 1000))},
            "log_likelihood": {"obs": log_lik.reshape(4, 1000, N)},
            "sample_stats": {"log_p": log_p.reshape(4, 1000), "log_q": log_q.reshape(4, 1000)},
        }
    )
    with pytest.warns(VariationalLooWarning, match=r"k-hat of log p - log q is 0\.\d\d > 0\.7.*not valid"):
        flagged = pyro_elbo.loo(idata)
    assert flagged.warning


def test_an_exact_guide_has_bounded_weights_not_a_heavy_tail() -> None:
    """q = the posterior: log p - log q is constant; R's PSIS says k = inf there, which would read as
    'q too far'; the k-hat of q alone is -inf (bounded weights) and the LOO is the exact one."""
    result = variational_loo(*grid_arrays(1.0))
    assert result.khat_q == -math.inf
    assert result.elpd == pytest.approx(exact_loo(), abs=0.01)


def test_data_without_log_p_or_observed_sites_is_refused_by_name() -> None:
    mcmc_like = from_dict({"posterior": {"mu": np.zeros((2, 50))}, "log_likelihood": {"obs": np.zeros((2, 50, 3))}})
    with pytest.raises(ValueError, match=r"no sample_stats log_p and log_q.*pyro_elbo.to_inference_data"):
        pyro_elbo.loo(mcmc_like)

    def no_obs(y: torch.Tensor) -> None:
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="no log_likelihood group: the model has no observed site"):
        pyro_elbo.loo(no_obs, guide_scaled(1.0), Y, num_samples=100)
    with pytest.raises(TypeError, match="takes no other positional"):
        pyro_elbo.loo(mcmc_like, 3)


def test_psis_draws_stand_for_the_posterior_of_a_too_wide_guide() -> None:
    """draws='psis' resamples a guide twice as wide as the posterior: the mean and variance of the
    resampled draws are within 4.89 standard errors of the posterior's (false alarm 1e-6 each).
    Their SE counts the importance weights' effective size n_eff = 1 / sum(w^2) and the
    resampling: var(mean) ~ v (1/n_eff + 1/S), var(variance) ~ 2 v^2 (1/n_eff + 1/S)."""
    pyro.set_rng_seed(2)
    num = 4000
    idata = pyro_elbo.to_inference_data(model, guide_scaled(2.0), Y, num_samples=num, draws="psis", predictive=False)
    attrs = idata.sample_stats.attrs if ARVIZ_MAJOR < 1 else idata["sample_stats"].attrs
    assert attrs["draws"] == "psis" and attrs["psis_khat"] < 0.5
    mu = idata.posterior["mu"].values.reshape(-1)
    guide_draws = pyro_elbo.to_inference_data(model, guide_scaled(2.0), Y, num_samples=num, predictive=False)
    log_w = guide_draws.sample_stats["log_weight"].values.reshape(-1)
    w = np.exp(log_w - log_w.max())
    n_eff = w.sum() ** 2 / (w**2).sum()
    factor = 1 / n_eff + 1 / num
    assert abs(mu.mean() - POST_MEAN) <= 4.89 * math.sqrt(POST_VAR * factor)
    assert abs(mu.var() - POST_VAR) <= 4.89 * POST_VAR * math.sqrt(2 * factor)
    assert abs(guide_draws.posterior["mu"].values.var() - POST_VAR) > 4.89 * POST_VAR * math.sqrt(2 * factor)
    with pytest.raises(ValueError, match="resampled by importance weights.*draws='guide'"):
        pyro_elbo.loo(idata)


def test_psis_draws_of_a_too_narrow_guide_warn() -> None:
    """Scale 0.25 on the quantile grid (no randomness; tail index of the weights 1 - 0.25^2): the
    resampling warns with the k-hat above 0.7, and returns it."""
    from pyro_elbo.arviz import _khat_and_resample

    _, log_p, log_q = grid_arrays(0.25)
    groups = {"posterior": {"mu": np.arange(4000.0)[None]}, "sample_stats": {"log_weight": (log_p - log_q)[None]}}
    with pytest.warns(
        UserWarning, match=r"draws='psis'\): the k-hat of the guide's importance weights is 0\.\d\d > 0\.7"
    ):
        khat = _khat_and_resample(groups, "psis")
    assert khat > 0.7 and groups["posterior"]["mu"].shape == (1, 4000)
    with pytest.raises(ValueError, match="draws must be 'guide' or 'psis'"):
        pyro_elbo.to_inference_data(model, guide_scaled(1.0), Y, num_samples=10, draws="sir")


#: PSIS-LOO of Pyro's NUTS (2000 draws after 1000 warmup, seed 0) on benchmarks/loo_vs_nuts.py's
#: varying-intercept model and data (20 groups, 400 points, data seed 0): elpd_loo, p_loo
NUTS_ELPD_LOO, NUTS_P_LOO = -573.8, 21.1


def _benchmark_module():  # noqa: ANN202
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "loo_vs_nuts.py"
    spec = importlib.util.spec_from_file_location("loo_vs_nuts", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_corrected_loo_of_an_iwae_guide_is_nuts_loo_and_a_narrow_guide_is_refused() -> None:
    """An AutoNormal trained with IWAE(8): pyro_elbo.loo within 1.5 nats of NUTS's PSIS-LOO (the
    estimates' Monte Carlo SEs, about 0.1 nats each, are well inside it); its scales x 0.4: the
    result says it is not valid (k-hat of log p - log q measured at 1.4, far above 0.7)."""
    from pyro.infer.autoguide import AutoNormal

    bench = _benchmark_module()
    args = bench.data()
    guide = AutoNormal(bench.model)
    pyro_elbo.fit(
        bench.model,
        guide,
        *args,
        objective=pyro_elbo.IWAE(num_particles=8),
        num_steps=3000,
        lr=0.02,
        progress=False,
        seed=0,
    )
    result = pyro_elbo.loo(bench.model, guide, *args, num_samples=4000)
    assert abs(elpd(result) - NUTS_ELPD_LOO) <= 1.5, elpd(result)
    with torch.no_grad():
        for name, value in pyro.get_param_store().items():
            if name.startswith("AutoNormal.scales"):
                value.unconstrained().add_(math.log(0.4))
    with pytest.warns(VariationalLooWarning, match="too far from the posterior.*not valid"):
        narrow = pyro_elbo.loo(bench.model, guide, *args, num_samples=4000)
    assert narrow.warning
