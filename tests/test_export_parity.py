"""One expected structure for the ArviZ export, checked against both builders: ``InferenceData``
(ArviZ 0.x, CI's Python 3.11 leg) and ``DataTree`` (ArviZ 1.x, CI's newest-Python leg). A builder
whose ArviZ is not installed is skipped here and run by the other leg; the installed one always
runs. Also: ``az.loo`` on the export, the combined log-likelihood of several observed sites."""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_elbo

if os.environ.get("PYRO_ELBO_REQUIRE_ALL_DEPS"):
    import arviz as az  # must be installed: fail, never skip
else:
    az = pytest.importorskip("arviz")

ARVIZ_MAJOR = int(az.__version__.split(".")[0])
S = 40  # draws
C = 4  # chains (of S / C draws each)
N = 6  # data points
POINTS = list("abcdef")
DIMS = {"z": ["point"], "obs": ["point"], "counts": ["feature", "point"], "w": ["coef"]}
COORDS = {"point": POINTS}


def model(x: torch.Tensor) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    pyro.deterministic("w_sum", w.sum(-1))
    with pyro.plate("data", N, dim=-1):
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("obs", dist.Normal(z + w[..., 0] * x, 0.5), obs=x)
        with pyro.plate("features", 2, dim=-2):
            rate = (z * torch.tensor([[1.0], [-1.0]])).exp()  # [2, N], features at dim -2
            pyro.sample("counts", dist.Poisson(rate), obs=torch.ones(2, N))


def guide(x: torch.Tensor) -> None:
    pyro.sample("mu", dist.Normal(pyro.param("mu_loc", torch.tensor(0.3)), 0.4))
    pyro.sample("w", dist.Normal(pyro.param("w_loc", torch.tensor([0.1, -0.2, 0.3])), 0.5).to_event(1))
    with pyro.plate("data", N, dim=-1):
        pyro.sample("z", dist.Normal(pyro.param("z_loc", torch.zeros(N)), 0.7))


def expected(float_dtype: str) -> dict[str, Any]:
    """group -> variable -> (dims, dtype, shape), plus every dim's coordinate values. Log-densities
    are float64 whatever the working dtype; draws and data keep it."""
    f, f64 = float_dtype, "float64"
    draw = ("chain", "draw")
    return {
        "groups": {
            "posterior": {
                "mu": (draw, f, (C, S // C)),
                "w": ((*draw, "coef"), f, (C, S // C, 3)),
                "w_sum": (draw, f, (C, S // C)),
                "z": ((*draw, "point"), f, (C, S // C, N)),
            },
            "posterior_predictive": {
                "obs": ((*draw, "point"), f, (C, S // C, N)),
                "counts": ((*draw, "feature", "point"), f, (C, S // C, 2, N)),
            },
            "log_likelihood": {
                "obs": ((*draw, "point"), f64, (C, S // C, N)),
                "counts": ((*draw, "feature", "point"), f64, (C, S // C, 2, N)),
            },
            "observed_data": {"obs": (("point",), f, (N,)), "counts": (("feature", "point"), f, (2, N))},
            "sample_stats": {name: (draw, f64, (C, S // C)) for name in ("log_p", "log_q", "log_weight")},
            "fit_history": {"loss": (("step",), f64, (3,)), "step_seconds": (("step",), f64, (3,))},
        },
        "coords": {
            "chain": list(range(C)),
            "draw": list(range(S // C)),
            "coef": [0, 1, 2],
            "point": POINTS,
            "feature": [0, 1],
            "step": [0, 1, 2],
        },
    }


def structure(data: Any) -> dict[str, Any]:
    """The same description of an ``InferenceData`` or a ``DataTree``."""
    import xarray as xr

    if isinstance(data, xr.DataTree):
        datasets = {name: node.to_dataset() for name, node in data.children.items()}
    else:
        datasets = {name: data[name] for name in data.groups()}
    groups, coords = {}, {}
    for name, ds in datasets.items():
        groups[name] = {v: (tuple(ds[v].dims), str(ds[v].dtype), tuple(ds[v].shape)) for v in ds.data_vars}
        for dim in ds.dims:
            values = ds[dim].values.tolist()
            assert coords.setdefault(dim, values) == values, f"coords of {dim} differ between groups"
    return {"groups": groups, "coords": coords}


def export_example(**kwargs: Any) -> Any:
    pyro.clear_param_store()
    x = torch.linspace(-1, 1, N)
    result = pyro_elbo.fit(model, guide, x, num_steps=3, progress=False, seed=0)
    return pyro_elbo.to_inference_data(
        model, guide, x, num_samples=S, chunk_size=16, dims=DIMS, coords=COORDS, fit_result=result, **kwargs
    )


@pytest.mark.parametrize("builder", ["InferenceData (ArviZ 0.x)", "DataTree (ArviZ 1.x)"])
def test_export_has_the_expected_structure(builder: str) -> None:
    if (ARVIZ_MAJOR >= 1) != builder.startswith("DataTree"):
        pytest.skip(f"ArviZ {az.__version__} installed; this builder runs in CI's other Python leg")
    data = export_example(log_likelihood="separate")
    assert type(data).__name__ == builder.split()[0]
    assert structure(data) == expected(str(torch.get_default_dtype()).replace("torch.", ""))


def _elpd(loo: Any) -> float:
    return float(loo.elpd_loo if hasattr(loo, "elpd_loo") else loo.elpd)


def test_loo_on_separate_and_combined_log_likelihood() -> None:
    separate = export_example(log_likelihood="separate")
    combined = export_example(log_likelihood="combined")  # fit(seed=0) makes the same draws
    ll, llc = separate["log_likelihood"], combined["log_likelihood"]
    assert set(llc.data_vars) == {"combined"} and llc["combined"].dims == ("chain", "draw", "point")
    assert list(llc["combined"]["point"].values) == POINTS  # the observed sites' own dims, not the plate's
    want = ll["obs"].values + ll["counts"].values.sum(axis=2)  # same seed: the same draws
    np.testing.assert_allclose(llc["combined"].values, want, rtol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k-hat warnings: 40 draws
        elpds = [_elpd(az.loo(separate, var_name="obs")), _elpd(az.loo(combined))]
    assert all(math.isfinite(e) for e in elpds)


def test_default_combines_observed_sites_that_share_the_data_plate() -> None:
    """log_likelihood='auto' (the default): 'obs' and 'counts' share the plate of the points, so a
    left-out point is both of them, and az.loo needs no var_name."""
    auto = export_example()
    assert set(auto["log_likelihood"].data_vars) == {"combined"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k-hat warnings: 40 draws
        assert math.isfinite(_elpd(az.loo(auto)))


def test_combined_needs_a_shared_plate_and_num_samples_must_be_positive() -> None:
    def two_plates(x: torch.Tensor) -> None:
        with pyro.plate("a", N):
            pyro.sample("ya", dist.Normal(0.0, 1.0), obs=x)
        with pyro.plate("b", N):
            pyro.sample("yb", dist.Normal(0.0, 1.0), obs=x)

    x = torch.zeros(N)
    with pytest.raises(ValueError, match=r"needs a plate that every observed site shares \('ya' in \['a'\]"):
        pyro_elbo.to_inference_data(two_plates, lambda x: None, x, num_samples=5, log_likelihood="combined")
    with pytest.raises(ValueError, match="log_likelihood must be 'separate', 'combined' or 'auto'"):
        pyro_elbo.to_inference_data(two_plates, lambda x: None, x, num_samples=5, log_likelihood="joint")
    for bad in (0, -3):
        with pytest.raises(ValueError, match=f"num_samples and chunk_size must be >= 1, got {bad}"):
            pyro_elbo.to_inference_data(two_plates, lambda x: None, x, num_samples=bad)


def test_loo_is_finite_for_float32_draws_far_in_the_tail() -> None:
    """Pointwise log-likelihoods near -1e4 overflow exp() in float32 (az.loo gave NaN): the export
    stores them in float64."""
    torch.set_default_dtype(torch.float32)
    y = torch.full((N,), 300.0)

    def far(y: torch.Tensor) -> None:
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        with pyro.plate("data", N):
            pyro.sample("y", dist.Normal(loc, 2.0), obs=y)

    def far_guide(y: torch.Tensor) -> None:
        pyro.sample("loc", dist.Normal(0.0, 1.0))

    data = pyro_elbo.to_inference_data(far, far_guide, y, num_samples=200)
    assert data["log_likelihood"]["y"].dtype == np.float64
    assert data["posterior"]["loc"].dtype == np.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isfinite(_elpd(az.loo(data)))
