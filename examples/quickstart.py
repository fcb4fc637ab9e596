"""Quick start: fit a guide, then ask how far it is from the posterior
=======================================================================

A normal model with unknown mean and scale, a mean-field :class:`~pyro.infer.autoguide.AutoNormal`
guide trained with :func:`pyro_elbo.fit`, and the KL-gap report of
:func:`pyro_elbo.kl_gap`: the ELBO, the IWAE ladder and CUBO with standard errors, the bracket on
``log p(x)`` and on ``KL(q || p)``, PSIS k-hat, the effective sample size and a verdict. Run::

    python examples/quickstart.py [steps] [particles]
    pyro-elbo run examples/quickstart.py
"""

from __future__ import annotations

import sys

import pyro
import pyro.distributions as dist
import torch


def model(y: torch.Tensor) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, sigma), obs=y)


def data() -> tuple[torch.Tensor]:
    """200 draws from N(3, 2^2), the same in every run."""
    gen = torch.Generator().manual_seed(0)
    return (3.0 + 2.0 * torch.randn(200, generator=gen, dtype=torch.get_default_dtype()),)


def main(steps: int = 2000, particles: int = 10_000) -> None:
    from pyro.infer.autoguide import AutoNormal

    import pyro_elbo

    pyro.clear_param_store()
    (y,) = data()
    guide = AutoNormal(model)
    result = pyro_elbo.fit(model, guide, y, num_steps=steps, lr=0.02, seed=0, progress=False)
    print(result)
    result.plot()  # the loss curve, and the last half of the run on its own scale
    report = pyro_elbo.kl_gap(model, guide, y, num_particles=particles)
    print(report)
    report.plot()


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
