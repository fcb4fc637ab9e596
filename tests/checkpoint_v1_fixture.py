"""The program behind ``tests/data/checkpoint_v1.pt``, a checkpoint in format
``pyro_elbo.checkpoint/1`` written by ``fit`` before ``pyro_elbo.train`` became a package (commit
bf56bad). Not collected. Regenerate with the old module only:

    mkdir /tmp/old && git archive bf56bad | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old python tests/checkpoint_v1_fixture.py tests/data/checkpoint_v1.pt
"""

from __future__ import annotations

import sys

import pyro
import pyro.distributions as dist
import torch

DATA = torch.tensor([0.5, 1.5, 1.0, -0.3, 0.8], dtype=torch.float64)


def model() -> None:
    prior_loc = pyro.param("prior_loc", torch.tensor(0.2, dtype=torch.float64))
    z = pyro.sample("z", dist.Normal(prior_loc, 1.0))
    with pyro.plate("data", len(DATA)):
        pyro.sample("x", dist.Normal(z, 0.7), obs=DATA)


def guide() -> None:
    loc = pyro.param("loc", torch.tensor(0.0, dtype=torch.float64))
    scale = pyro.param("scale", torch.tensor(1.0, dtype=torch.float64), constraint=dist.constraints.positive)
    pyro.sample("z", dist.Normal(loc, scale))


def options() -> dict:
    """fit's settings for the fixture run (steps 1-5 written to the checkpoint, 10 in all)."""
    import pyro_elbo

    return dict(
        objective=pyro_elbo.IWAE(num_particles=4),
        lr=0.05,
        seed=11,
        progress=False,
        checkpoint_every=5,
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
        optimizer_options={"foreach": False},
    )


if __name__ == "__main__":
    from pyro_elbo import train as old

    pyro.clear_param_store()
    old.fit(model, guide, num_steps=5, checkpoint=sys.argv[1], **options())
    print(old.__file__, old.load_checkpoint(sys.argv[1])["format"], old.load_checkpoint(sys.argv[1])["step"])
