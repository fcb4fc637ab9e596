"""PSIS-LOO of a varying-intercept regression (20 groups, 400 observations) from NUTS, from guide
draws with plain ``az.loo``, and from guide draws with ``pyro_elbo.loo`` (corrected for q), for a
fitted AutoNormal, its scales times 1.5 and times 0.4, and an AutoNormal trained with IWAE(8).

Usage: ``python benchmarks/loo_vs_nuts.py [--nuts-samples 2000] [--draws 4000]``. Prints a
Markdown table; NUTS's elpd is the reference (its own PSIS-LOO over its draws).
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import AutoNormal

import pyro_elbo
from pyro_elbo.loo import variational_loo

GROUPS, PER_GROUP, SEED = 20, 20, 0


def model(group: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(2.0))
    beta = pyro.sample("beta", dist.Normal(0.0, 2.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
    with pyro.plate("groups", GROUPS):
        alpha = pyro.sample("alpha", dist.Normal(mu, tau))
    with pyro.plate("data", len(group)):
        pyro.sample("y", dist.Normal(alpha[..., group] + beta * x, sigma), obs=y)


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seed 0: group means N(1, 1.5), slope 0.7, noise SD 1."""
    rng = np.random.default_rng(SEED)
    group = np.repeat(np.arange(GROUPS), PER_GROUP)
    x = rng.normal(size=group.size)
    y = rng.normal(rng.normal(1.0, 1.5, GROUPS)[group] + 0.7 * x, 1.0)
    return torch.as_tensor(group), torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)


def nuts_loo(args: tuple[torch.Tensor, ...], num_samples: int, warmup: int) -> tuple[float, float]:
    import arviz as az

    pyro.set_rng_seed(SEED)
    mcmc = MCMC(NUTS(model), num_samples=num_samples, warmup_steps=warmup, num_chains=1, disable_progbar=True)
    mcmc.run(*args)
    s = mcmc.get_samples()
    group, x, y = args
    mean = s["alpha"][:, group] + s["beta"][:, None] * x
    ll = dist.Normal(mean, s["sigma"][:, None]).log_prob(y).detach().numpy()
    idata = az.from_dict(posterior={"mu": s["mu"].numpy()[None]}, log_likelihood={"y": ll[None]})
    result = az.loo(idata)
    return float(result.elpd_loo), float(result.p_loo)


def guides(args: tuple[torch.Tensor, ...], steps: int) -> dict[str, AutoNormal]:
    out = {}
    for name, objective in (("AutoNormal (ELBO)", None), ("AutoNormal (IWAE(8))", pyro_elbo.IWAE(num_particles=8))):
        pyro.clear_param_store()
        guide = AutoNormal(model)
        pyro_elbo.fit(model, guide, *args, objective=objective, num_steps=steps, lr=0.02, progress=False, seed=SEED)
        params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
        out[name] = (guide, params, 0.0)
        if objective is None:
            out["AutoNormal, scales x 1.5"] = (guide, params, math.log(1.5))
            out["AutoNormal, scales x 0.4"] = (guide, params, math.log(0.4))
    return out  # type: ignore[return-value]


def main() -> None:
    import arviz as az

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nuts-samples", type=int, default=2000)
    parser.add_argument("--draws", type=int, default=4000)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=3000, help="SVI steps of each guide")
    options = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    args = data()
    start = time.perf_counter()
    nuts = nuts_loo(args, options.nuts_samples, options.warmup)
    print(f"NUTS: {options.nuts_samples} draws after {options.warmup} warmup in {time.perf_counter() - start:.0f} s")
    rows = [("NUTS (PSIS-LOO of its draws)", nuts, None, "")]
    for name, (guide, params, log_scale) in guides(args, options.steps).items():
        pyro.clear_param_store()
        guide(*args)  # create the params, then set them
        with torch.no_grad():
            for key, value in params.items():
                if key.startswith("AutoNormal.scales"):
                    pyro.get_param_store()[key] = torch.exp(value.log() + log_scale)
                else:
                    pyro.get_param_store()[key] = value
        pyro.set_rng_seed(SEED)
        idata = pyro_elbo.to_inference_data(model, guide, *args, num_samples=options.draws, predictive=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plain = az.loo(idata)
            corrected = pyro_elbo.loo(idata)
        log_lik = idata.log_likelihood["y"].values.reshape(options.draws, -1)
        stats = idata.sample_stats
        khat_q = variational_loo(log_lik, stats["log_p"].values.reshape(-1), stats["log_q"].values.reshape(-1)).khat_q
        note = "not valid" if any("not valid" in str(w.message) for w in caught) else ""
        khat = (khat_q, float(np.max(corrected.pareto_k.values)))
        rows.append(
            (
                name,
                (float(plain.elpd_loo), float(plain.p_loo)),
                (float(corrected.elpd_loo), float(corrected.p_loo), khat, bool(corrected.warning)),
                note,
            )
        )
    print(
        "| posterior | plain az.loo elpd_loo (p_loo) | pyro_elbo.loo elpd_loo (p_loo) | k-hat of log p - log q | "
        "largest pointwise k-hat | ELPDData.warning |"
    )
    print("|---|---|---|---|---|---|")
    for name, plain, corrected, note in rows:
        if corrected is None:
            print(f"| {name} | {plain[0]:.1f} ({plain[1]:.1f}) | | | | |")
        else:
            print(
                f"| {name} | {plain[0]:.1f} ({plain[1]:.1f}) | {corrected[0]:.1f} ({corrected[1]:.1f}) | {corrected[2][0]:.2f} | {corrected[2][1]:.2f} | {corrected[3]} {note} |"
            )


if __name__ == "__main__":
    main()
