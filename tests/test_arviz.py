"""to_inference_data: groups, dims, shapes, LOO/summary, netCDF round trip, and draws that follow
the guide (false alarm 1e-6)."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_elbo

if os.environ.get("PYRO_ELBO_REQUIRE_ALL_DEPS"):
    import arviz as az  # must be installed: fail, never skip
else:
    az = pytest.importorskip("arviz")

warnings.filterwarnings("ignore", category=FutureWarning)

X = torch.linspace(-1, 1, 6)


def group_names(data) -> set[str]:
    """Groups of an ``InferenceData`` (ArviZ 0.x) or a ``DataTree`` (ArviZ 1.x)."""
    return set(data.groups()) if callable(data.groups) else set(data.children)


def elpd(loo) -> float:
    return float(loo.elpd_loo if hasattr(loo, "elpd_loo") else loo.elpd)  # ArviZ 0.x / 1.x


def model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    pyro.deterministic("w_sum", w.sum(-1))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("obs", dist.Normal(z + w[..., 0] * x, 0.5), obs=x)


def guide(x):
    pyro.sample("mu", dist.Normal(pyro.param("mu_loc", torch.tensor(0.3)), 0.4))
    pyro.sample("w", dist.Normal(pyro.param("w_loc", torch.tensor([0.1, -0.2, 0.3])), 0.5).to_event(1))
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(pyro.param("z_loc", torch.zeros(len(x))), 0.7))


def test_groups_dims_and_shapes() -> None:
    idata = pyro_elbo.to_inference_data(
        model, guide, X, num_samples=300, chunk_size=128, dims={"z": ["point"], "obs": ["point"], "w": ["coef"]},
        coords={"point": list("abcdef")},
    )
    assert {"posterior", "posterior_predictive", "log_likelihood", "observed_data", "sample_stats"} <= group_names(idata)
    post = idata.posterior
    assert post["mu"].shape == (1, 300)
    assert post["w"].shape == (1, 300, 3) and post["w"].dims == ("chain", "draw", "coef")
    assert post["z"].shape == (1, 300, 6) and list(post["z"].point.values) == list("abcdef")
    assert post["w_sum"].shape == (1, 300)
    assert torch.allclose(torch.as_tensor(post["w"].values.sum(-1)), torch.as_tensor(post["w_sum"].values), atol=1e-5)
    assert idata.log_likelihood["obs"].shape == (1, 300, 6)
    assert idata.posterior_predictive["obs"].shape == (1, 300, 6)
    assert idata.observed_data["obs"].shape == (6,)
    stats = idata.sample_stats
    assert set(stats.data_vars) == {"log_p", "log_q", "log_weight"}
    assert torch.allclose(
        torch.as_tensor(stats["log_weight"].values), torch.as_tensor(stats["log_p"].values - stats["log_q"].values)
    )


def test_loo_summary_and_netcdf_round_trip(tmp_path: Path) -> None:
    result = pyro_elbo.fit(model, guide, X, num_steps=20, progress=False)
    idata = pyro_elbo.to_inference_data(model, guide, X, num_samples=200, fit_result=result)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loo = az.loo(idata)
        summary = az.summary(idata, var_names=["mu", "w"])
    assert math.isfinite(elpd(loo))
    assert list(summary.index) == ["mu", "w[0]", "w[1]", "w[2]"]
    path = tmp_path / "idata.nc"
    idata.to_netcdf(str(path))
    back = az.from_netcdf(str(path))
    assert group_names(back) == group_names(idata)
    assert back.fit_history["loss"].shape == (20,)
    assert (back.posterior["w"].values == idata.posterior["w"].values).all()


def test_exported_draws_follow_the_guide() -> None:
    """Each exported mean is within 4.89 standard errors of the guide's mean (false alarm 1e-6 each)."""
    n = 4000
    idata = pyro_elbo.to_inference_data(model, guide, X, num_samples=n, predictive=False)
    checks = [("mu", 0.3, 0.4), ("w", torch.tensor([0.1, -0.2, 0.3]), 0.5), ("z", torch.zeros(6), 0.7)]
    for name, loc, scale in checks:
        draws = torch.as_tensor(idata.posterior[name].values[0])
        mean = draws.mean(0)
        assert torch.all((mean - loc).abs() <= 4.89 * scale / math.sqrt(n)), name
        sd = draws.std(0)  # the SD of a sample SD is about sd / sqrt(2 n)
        assert torch.all((sd - scale).abs() <= 4.89 * scale / math.sqrt(2 * n)), name


def test_subsampled_plates_are_refused() -> None:
    def sub_model(x):
        with pyro.plate("data", len(x), subsample_size=2) as idx:
            pyro.sample("obs", dist.Normal(0.0, 1.0), obs=x[idx])

    with pytest.raises(ValueError, match="plate 'data' is subsampled"):
        pyro_elbo.to_inference_data(sub_model, lambda x: None, X, num_samples=10)
