"""A model with a discrete latent trained with VIMCO: which of three clusters made each point
==========================================================================================

The guide is amortized: a small network maps each point to its cluster probabilities. VIMCO's
leave-one-out baselines make the score-function gradient usable; the exact posterior over each
point's cluster is available by enumeration, so the script prints how close the guide got. Run::

    python examples/mixture_vimco.py [steps]
    pyro-elbo run examples/mixture_vimco.py --objective vimco --particles 8 --lr 0.05
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

LOCS = (-3.0, 0.0, 3.0)
WEIGHTS = (0.3, 0.4, 0.3)

with torch.random.fork_rng(devices=[]):  # the same initial network in every run
    torch.manual_seed(0)
    classifier = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, len(LOCS)))


def make_data(n: int = 200, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    k = torch.multinomial(torch.tensor(WEIGHTS), n, replacement=True, generator=gen)
    return (torch.tensor(LOCS)[k] + torch.randn(n, generator=gen)).to(torch.get_default_dtype())


def model(x: torch.Tensor) -> None:
    locs = x.new_tensor(LOCS)
    with pyro.plate("data", x.shape[0]):
        k = pyro.sample("k", dist.Categorical(x.new_tensor(WEIGHTS)))
        pyro.sample("x", dist.Normal(locs[k], 1.0), obs=x)


def guide(x: torch.Tensor) -> None:
    pyro.module("classifier", classifier)
    logits = classifier(x.unsqueeze(-1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("k", dist.Categorical(logits=logits))


def data() -> tuple[torch.Tensor]:
    return (make_data(),)


def exact_posterior(x: torch.Tensor) -> torch.Tensor:
    log_joint = torch.tensor(WEIGHTS).log() + dist.Normal(torch.tensor(LOCS), 1.0).log_prob(x.unsqueeze(-1))
    return torch.softmax(log_joint, -1)


def main(steps: int = 1000) -> None:
    import pyro_elbo

    x = make_data()
    result = pyro_elbo.fit(
        model, guide, x, objective=pyro_elbo.VIMCO(num_particles=8), num_steps=steps, lr=0.05, seed=0, progress=False
    )
    with torch.no_grad():
        probs = torch.softmax(classifier(x.unsqueeze(-1)), -1)
    error = (probs - exact_posterior(x)).abs().max()
    print(f"final loss {result.history[-1]:.3f}; largest error in a cluster probability: {float(error):.3f}")
    report = pyro_elbo.kl_gap(model, guide, x, num_particles=2000)
    print(report)
    report.plot()


if __name__ == "__main__":
    import sys

    main(*(int(a) for a in sys.argv[1:]))
