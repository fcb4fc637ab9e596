"""pyro_elbo.loo against R's loo package (``loo_approximate_posterior``) on the same exported
arrays: every pointwise elpd, p_loo, Monte Carlo SE and Pareto k-hat, and the totals, to 1e-6
relative. Runs where ``Rscript`` and R's ``loo`` are installed (CI installs them in .ci/run)."""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

import pyro_elbo
from pyro_elbo.loo import variational_loo

RSCRIPT = shutil.which("Rscript")


def _r_has_loo() -> bool:
    if RSCRIPT is None:
        return False
    done = subprocess.run([RSCRIPT, "-e", "library(loo)"], capture_output=True, timeout=120)
    return done.returncode == 0


pytestmark = pytest.mark.skipif(
    not _r_has_loo(), reason="R's loo package is not installed (apt-get install r-cran-loo; CI's .ci/run does)"
)

R_SCRIPT = """
suppressMessages(library(loo))
args <- commandArgs(trailingOnly = TRUE)
ll <- as.matrix(read.csv(file.path(args[1], "log_lik.csv"), header = FALSE))
log_p <- scan(file.path(args[1], "log_p.csv"), quiet = TRUE)
log_g <- scan(file.path(args[1], "log_q.csv"), quiet = TRUE)
x <- suppressWarnings(loo_approximate_posterior(unname(ll), log_p = log_p, log_g = log_g))
write.table(format(x$pointwise, digits = 17), file.path(args[1], "pointwise.csv"),
            sep = ",", row.names = FALSE, col.names = FALSE, quote = FALSE)
write.table(format(x$estimates, digits = 17), file.path(args[1], "estimates.csv"),
            sep = ",", row.names = FALSE, col.names = FALSE, quote = FALSE)
cat(as.character(packageVersion("loo")), "\\n")
"""

GROUPS, PER_GROUP = 8, 10


def varying_intercepts(group: torch.Tensor, y: torch.Tensor | None = None) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(2.0))
    with pyro.plate("groups", GROUPS):
        alpha = pyro.sample("alpha", dist.Normal(mu, tau))
    with pyro.plate("data", len(group)):
        pyro.sample("y", dist.Normal(alpha[..., group], 1.0), obs=y)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(3)
    group = np.repeat(np.arange(GROUPS), PER_GROUP)
    y = rng.normal(rng.normal(1.0, 1.5, GROUPS)[group], 1.0)
    return torch.as_tensor(group), torch.as_tensor(y, dtype=torch.float32)


@functools.lru_cache(maxsize=1)
def _fitted() -> dict[str, torch.Tensor]:
    """An AutoNormal fitted to the varying-intercept model (once for every scale): its parameters."""
    pyro.clear_param_store()
    group, y = _data()
    guide = AutoNormal(varying_intercepts)
    pyro_elbo.fit(varying_intercepts, guide, group, y, num_steps=300, lr=0.05, progress=False, seed=0)
    return {name: value.detach().clone() for name, value in pyro.get_param_store().items()}


def _exported(scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fitted AutoNormal with its scales times ``scale``, 2000 draws exported."""
    group, y = _data()
    pyro.clear_param_store()
    guide = AutoNormal(varying_intercepts)
    guide(group, y)  # creates the parameters, set below
    store = pyro.get_param_store()
    for name, value in _fitted().items():
        store[name] = value * scale if name.startswith("AutoNormal.scales") else value
    pyro.set_rng_seed(0)
    idata = pyro_elbo.to_inference_data(varying_intercepts, guide, group, y, num_samples=2000, predictive=False)
    log_lik = idata.log_likelihood["y"].values.reshape(2000, -1)
    stats = idata.sample_stats
    return log_lik, stats["log_p"].values.reshape(-1), stats["log_q"].values.reshape(-1)


@pytest.mark.parametrize("scale", [1.0, 1.5, 0.4])
def test_loo_matches_r_loo_approximate_posterior(scale: float, tmp_path: Path) -> None:
    """Good, too wide and too narrow guides (k-hat from below 0.5 to above 0.7)."""
    log_lik, log_p, log_q = _exported(scale)
    for name, value in (("log_lik", log_lik), ("log_p", log_p), ("log_q", log_q)):
        np.savetxt(
            tmp_path / f"{name}.csv", np.atleast_2d(value) if value.ndim == 2 else value, fmt="%.17g", delimiter=","
        )
    (tmp_path / "loo.R").write_text(R_SCRIPT)
    assert RSCRIPT is not None
    done = subprocess.run(
        [RSCRIPT, str(tmp_path / "loo.R"), str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    r_pointwise = np.loadtxt(tmp_path / "pointwise.csv", delimiter=",", ndmin=2)
    r_estimates = np.loadtxt(tmp_path / "estimates.csv", delimiter=",", ndmin=2)
    ours = variational_loo(log_lik, log_p, log_q)
    # R's columns: elpd_loo, mcse_elpd_loo, p_loo, looic, influence_pareto_k
    np.testing.assert_allclose(ours.elpd_i, r_pointwise[:, 0], rtol=1e-6, atol=0)
    np.testing.assert_allclose(ours.mcse_i, r_pointwise[:, 1], rtol=1e-6, atol=0)
    np.testing.assert_allclose(ours.p_i, r_pointwise[:, 2], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(ours.pareto_k, r_pointwise[:, 4], rtol=1e-6, atol=0)
    # estimates: rows elpd_loo, p_loo, looic; columns Estimate, SE
    np.testing.assert_allclose([ours.elpd, ours.se, ours.p_loo], r_estimates[[0, 0, 1], [0, 1, 0]], rtol=1e-6)
    print(
        f"scale {scale}: R loo {done.stdout.strip()}, k-hat {ours.pareto_k.min():.3f}..{ours.pareto_k.max():.3f}, "
        f"largest relative differences: elpd_i {np.max(np.abs(ours.elpd_i / r_pointwise[:, 0] - 1)):.2e}, "
        f"k-hat {np.max(np.abs(ours.pareto_k / r_pointwise[:, 4] - 1)):.2e}, "
        f"mcse {np.max(np.abs(ours.mcse_i / r_pointwise[:, 1] - 1)):.2e}, elpd {abs(ours.elpd / r_estimates[0, 0] - 1):.2e}"
    )
