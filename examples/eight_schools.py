"""Eight schools (Rubin 1981), centered and non-centered, with a mean-field guide
==============================================================================

The centered model has a funnel between ``tau`` and ``theta`` that a mean-field Gaussian cannot
follow; the non-centered one removes it. The KL-gap report tells them apart. Data ship with ArviZ.
Run::

    python examples/eight_schools.py               # fit both, print both reports
    pyro-elbo run examples/eight_schools.py                      # non-centered (the file's model)
    pyro-elbo run examples/eight_schools.py:centered_model       # centered
"""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import torch

#: standard errors of the eight effects (Rubin 1981, Table 2; ArviZ's bundled copy of the data set
#: stores only the effects and school names)
SIGMA = [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]


def load() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Treatment effects ``y`` and school names (bundled with ArviZ), and the standard errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az

        bundled = az.load_arviz_data("centered_eight")
    dtype = torch.get_default_dtype()
    y = torch.as_tensor(bundled.observed_data.obs.values, dtype=dtype)
    sigma = torch.tensor(SIGMA, dtype=dtype)
    return y, sigma, [str(s) for s in bundled.observed_data.school.values]


def centered_model(y: torch.Tensor, sigma: torch.Tensor) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(y)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def noncentered_model(y: torch.Tensor, sigma: torch.Tensor) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(y)):
        theta_tilde = pyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", mu + tau * theta_tilde)
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


model = noncentered_model


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """The model's arguments, for ``pyro-elbo run``."""
    y, sigma, _ = load()
    return y, sigma


#: ArviZ dims and coords, picked up by ``pyro-elbo run``
dims = {"theta": ["school"], "theta_tilde": ["school"], "obs": ["school"]}
coords = {"school": load()[2]}


def main(steps: int = 3000, particles: int = 100_000) -> None:
    from pyro.infer.autoguide import AutoNormal

    import pyro_elbo

    y, sigma, _ = load()
    for name, m in (("centered", centered_model), ("non-centered", noncentered_model)):
        pyro.clear_param_store()
        guide = AutoNormal(m)
        pyro_elbo.fit(
            m,
            guide,
            y,
            sigma,
            num_steps=steps,
            lr=0.02,
            seed=0,
            progress=False,
            objective=pyro_elbo.ELBO(num_particles=8),
        )
        print(f"--- {name} ---")
        report = pyro_elbo.kl_gap(m, guide, y, sigma, num_particles=particles)
        print(report)
        print()
        report.plot().axes[0].set_ylabel(f"{name}: bound on log p(x) (nats)")


if __name__ == "__main__":
    import sys

    main(*(int(a) for a in sys.argv[1:]))
