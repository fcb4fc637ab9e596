"""to_inference_data: groups, dims, shapes, LOO/summary, netCDF round trip, draws that follow
the guide (false alarm 1e-6), predictive draws shaped as their data, and the particle layout."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from pyro.infer.reparam import LocScaleReparam

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
        model,
        guide,
        X,
        num_samples=300,
        chunk_size=128,
        dims={"z": ["point"], "obs": ["point"], "w": ["coef"]},
        coords={"point": list("abcdef")},
    )
    assert {"posterior", "posterior_predictive", "log_likelihood", "observed_data", "sample_stats"} <= group_names(
        idata
    )
    post = idata.posterior
    assert post["mu"].shape == (4, 75)
    assert post["w"].shape == (4, 75, 3) and post["w"].dims == ("chain", "draw", "coef")
    assert post["z"].shape == (4, 75, 6) and list(post["z"].point.values) == list("abcdef")
    assert post["w_sum"].shape == (4, 75)
    assert torch.allclose(torch.as_tensor(post["w"].values.sum(-1)), torch.as_tensor(post["w_sum"].values), atol=1e-5)
    assert idata.log_likelihood["obs"].shape == (4, 75, 6)
    assert idata.posterior_predictive["obs"].shape == (4, 75, 6)
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
        values = idata.posterior[name].values
        draws = torch.as_tensor(values.reshape(-1, *values.shape[2:]))
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


def test_nonfinite_observed_data_is_refused_naming_the_site() -> None:
    y = X.clone()
    y[2] = math.inf
    with pytest.raises(ValueError, match=r"to_inference_data: observed site 'obs' has 1 non-finite value"):
        pyro_elbo.to_inference_data(model, guide, y, num_samples=10)


def test_absurd_num_samples_fails_fast_naming_num_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    """10**15 draws of 26 values each are 2e17 bytes: refused before any draw is kept. The estimate
    counts each draw's entries: 1 + 3 + 6 latent, 1 deterministic, 6 log-likelihood, 6 predictive
    and log_p, log_q, log_weight = 26 float64 values (208 bytes); on a machine with 2 * 208 * 1000
    bytes, 1000 draws pass and 1001 are refused."""
    with pytest.raises(ValueError, match=r"to_inference_data\(num_samples=1000000000000000\) would export"):
        pyro_elbo.to_inference_data(model, guide, X, num_samples=10**15)
    import pyro_elbo.arviz as export

    monkeypatch.setattr(export, "_machine_memory", lambda: 2 * 208 * 1000)
    assert export.to_inference_data(model, guide, X, num_samples=1000).posterior["mu"].shape == (4, 250)
    with pytest.raises(ValueError, match=r"num_samples=1001\) would export .*\(26 float64 values per draw\)"):
        export.to_inference_data(model, guide, X, num_samples=1001)


def mv_model(y):
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    design = torch.linspace(-1, 1, 12).reshape(4, 3)
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(torch.mv(design, w), 0.5), obs=y)  # [K, 1, 3] breaks mv


def mv_guide(y):
    pyro.sample("w", dist.Normal(torch.tensor([0.5, -1.0, 2.0]), 0.1).to_event(1))


@pytest.mark.parametrize("mode", ["auto", "vmap", "sequential", False])
def test_vectorize_particles_reaches_the_draws(mode: bool | str) -> None:
    """Not the model's keyword: a model that cannot take a particle plate exports on every other
    path, and ``"plate"`` (or ``True``) is taken as asked and fails there."""
    y = torch.zeros(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pyro_elbo.ParticlePathWarning)
        idata = pyro_elbo.to_inference_data(mv_model, mv_guide, y, num_samples=20, vectorize_particles=mode)
    chosen = [str(w.message) for w in caught if issubclass(w.category, pyro_elbo.ParticlePathWarning)]
    assert (mode == "auto") == any("drawn with torch.func.vmap" in m for m in chosen), chosen  # auto says so
    assert idata.posterior["w"].shape == (4, 5, 3)
    assert idata.log_likelihood["y"].shape == (4, 5, 4)


@pytest.mark.parametrize("mode", ["plate", True])
def test_vectorize_particles_plate_is_taken_as_asked(mode: bool | str) -> None:
    with pytest.raises(ValueError, match="one vectorized pass"):
        pyro_elbo.to_inference_data(mv_model, mv_guide, torch.zeros(4), num_samples=20, vectorize_particles=mode)


def test_an_export_past_max_seconds_is_refused_after_its_first_chunk() -> None:
    """Timed on the first chunk: 3 chunks of a zero-second budget are refused naming num_samples and
    max_seconds; one chunk (nothing left to estimate) is never refused."""
    with pytest.raises(ValueError, match=r"to_inference_data\(num_samples=30\) would take .* max_seconds \(now 0\)"):
        pyro_elbo.to_inference_data(model, guide, X, num_samples=30, chunk_size=10, max_seconds=0.0)
    idata = pyro_elbo.to_inference_data(model, guide, X, num_samples=10, chunk_size=10, max_seconds=0.0)
    assert idata.posterior["mu"].shape == (2, 5)


def reparam_model(y: torch.Tensor) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(2.0))
    with pyro.plate("groups", len(y)):
        with pyro.poutine.reparam(config={"theta": LocScaleReparam(0.0)}):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, 1.0), obs=y)
    pyro.factor("shrinkage", -0.1 * tau**2)


def test_reparam_sites_are_latents_and_factors_are_not_observations() -> None:
    """LocScaleReparam's ``theta`` (which Pyro marks observed, a Delta at mu + tau * decentered) is
    in the posterior with its auxiliary site; the ``pyro.factor`` term is in log_p, not in
    log_likelihood or observed_data; az.loo and pyro_elbo.loo take the export as it is."""
    y = torch.linspace(-2, 2, 8)
    guide = AutoNormal(reparam_model)
    pyro_elbo.fit(reparam_model, guide, y, num_steps=20, progress=False, seed=0)
    idata = pyro_elbo.to_inference_data(reparam_model, guide, y, num_samples=400)
    post = idata.posterior
    assert {"mu", "tau", "theta", "theta_decentered"} <= set(post.data_vars)
    want = post["mu"].values[..., None] + post["tau"].values[..., None] * post["theta_decentered"].values
    assert abs(post["theta"].values - want).max() < 1e-5
    assert set(idata.log_likelihood.data_vars) == {"obs"} and set(idata.observed_data.data_vars) == {"obs"}
    assert set(idata.posterior_predictive.data_vars) == {"obs"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k-hat notes of a 20-step guide
        assert math.isfinite(elpd(az.loo(idata))) and math.isfinite(elpd(pyro_elbo.loo(idata)))


def capture_recapture(history: torch.Tensor) -> None:
    """Cormack-Jolly-Seber: alive state ``z_t`` summed out, a survival logit per period sampled
    inside ``pyro.markov`` (where Pyro's infer_discrete raises KeyError)."""
    animals, periods = history.shape
    rho = pyro.sample("rho", dist.Beta(2.0, 2.0))
    alive = torch.ones(animals)
    seen = torch.zeros(animals, dtype=torch.bool)
    animal_plate = pyro.plate("animals", animals, dim=-1)  # one plate, entered once per period
    for t in pyro.markov(range(periods)):
        survival = torch.sigmoid(pyro.sample(f"s_{t}", dist.Normal(0.0, 1.0))) if t > 0 else torch.tensor(1.0)
        with animal_plate, pyro.poutine.mask(mask=seen):
            alive_prob = seen.float() * survival * alive + (1 - seen.float())
            alive = pyro.sample(f"z_{t}", dist.Bernoulli(alive_prob), infer={"enumerate": "parallel"})
            pyro.sample(f"y_{t}", dist.Bernoulli(rho * alive), obs=history[:, t])
        seen = seen | history[:, t].bool()


def test_where_infer_discrete_fails_the_rest_is_exported_with_the_marginal_log_likelihood() -> None:
    """The discrete sites are left out with a warning naming Pyro's infer_discrete; the continuous
    ones are exported; log_likelihood holds one marginal per animal whose sum, plus the prior
    terms, is each draw's log p (the discrete states summed out)."""
    history = (torch.rand(12, 4, generator=torch.Generator().manual_seed(0)) < 0.5).to(torch.get_default_dtype())
    history[:, 0] = 1.0
    continuous = ["rho", "s_1", "s_2", "s_3"]
    guide = AutoDiagonalNormal(pyro.poutine.block(capture_recapture, expose=continuous))
    guide(history)  # its parameters exist, as after training (an untrained export warns of that too)
    with pytest.warns(UserWarning, match=r"Pyro's infer_discrete failed on this model \(KeyError: 's_1'\)"):
        idata = pyro_elbo.to_inference_data(capture_recapture, guide, history, num_samples=40)
    post = idata.posterior
    assert set(post.data_vars) == set(continuous)
    assert set(idata.log_likelihood.data_vars) == {"y_0"} and idata.log_likelihood["y_0"].shape == (4, 10, 12)
    assert set(idata.observed_data.data_vars) == {f"y_{t}" for t in range(4)}
    prior = torch.as_tensor(dist.Beta(2.0, 2.0).log_prob(torch.as_tensor(post["rho"].values)))
    for name in continuous[1:]:
        prior = prior + dist.Normal(0.0, 1.0).log_prob(torch.as_tensor(post[name].values))
    log_lik = torch.as_tensor(idata.log_likelihood["y_0"].values).sum(-1)
    log_p = torch.as_tensor(idata.sample_stats["log_p"].values)
    assert torch.allclose(log_lik + prior.double(), log_p, atol=1e-4)


def test_summary_r_hat_is_a_number_and_arviz_does_not_warn() -> None:
    """Independent draws as 4 chains of 100: r_hat is finite (and near 1: 4.89 x its rough SE
    sqrt(1 / (chains x draws)) allows 0.25), and ArviZ warns nothing (warnings are errors here)."""
    idata = pyro_elbo.to_inference_data(model, guide, X, num_samples=400)
    assert idata.posterior.sizes["chain"] == 4 and idata.posterior.sizes["draw"] == 100
    summary = az.summary(idata, var_names=["mu", "w", "z"])
    r_hat = summary["r_hat"].to_numpy(dtype=float)
    assert np.isfinite(r_hat).all() and (abs(r_hat - 1) < 0.25).all(), r_hat


def test_a_site_the_model_cannot_replicate_is_left_out_of_the_predictive_with_a_warning() -> None:
    """Pyro's MuE ProfileHMM observes whole sequences with MissingDataDiscreteHMM, whose event
    shape (1, K) stands for a sequence of any length: it draws one step where the data has five.
    The site has no posterior predictive (named in a warning); its log-likelihood is exported and
    pyro_elbo.loo takes the export."""
    import pyro_examples_models

    example = pyro_examples_models.EXAMPLES["profile_hmm"]()
    with pytest.warns(UserWarning, match=r"no posterior predictive for observed site 'obs_seq'.*\(1, 4\).*\(6, 5, 4\)"):
        idata = pyro_elbo.to_inference_data(
            example.model, example.guide, *example.args, num_samples=20, vectorize_particles="sequential"
        )
    assert "posterior_predictive" not in group_names(idata)
    assert idata.log_likelihood["obs_seq"].shape == (4, 5, 6)
    assert idata.observed_data["obs_seq"].shape == (6, 5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyro_elbo.VariationalLooWarning)  # an untrained guide, 20 draws
        assert math.isfinite(elpd(pyro_elbo.loo(idata)))


def mixing_model(y):
    """Not written for batched latents: ``w[0]`` is the first particle's w under a particle plate."""
    w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    pyro.deterministic("first", w[0])
    pyro.sample("y", dist.Normal(w.sum(-1), 1.0), obs=y)


def mixing_guide(y):
    pyro.sample("w", dist.Normal(torch.tensor([1.0, -1.0]), 0.3).to_event(1))


def test_a_value_that_mixes_the_particles_is_drawn_one_particle_at_a_time() -> None:
    """``first`` has shape (2,) with 20 particles and () without: not a particle dim in front of its
    own shape. The plate passes the two-particle trial (where 2 particles look like a particle dim),
    so the export falls back to one particle at a time, says so once, and exports w[0] per draw;
    asked for the plate, it refuses naming the site."""
    y = torch.tensor(0.3)
    with pytest.warns(pyro_elbo.ParticlePathWarning, match="failed on the plate path.*'first'"):
        idata = pyro_elbo.to_inference_data(mixing_model, mixing_guide, y, num_samples=20)
    assert (idata.posterior["first"].values == idata.posterior["w"].values[..., 0]).all()
    with pytest.raises(ValueError, match=r"site 'first' has shape \(2,\) with 20 particles but \(\) without"):
        pyro_elbo.to_inference_data(mixing_model, mixing_guide, y, num_samples=20, vectorize_particles="plate")
