"""Cost per particle, one run per particle vs ``torch.func.vmap``, for programs that vmap could not
batch before Beta draws and recurrent cells got vmap-able equivalents: a Dirichlet-process mixture
(stick-breaking Beta latents, as Pyro's ``examples/dirichlet_process_mixture.py``) and an AIR-like
guide whose steps run an ``nn.LSTMCell`` (as Pyro's ``examples/air``). Neither takes a particle
plate (``mu[z]`` with a batched ``z``; the cell's state is shaped for one particle), so before,
``vectorize_particles="auto"`` drew their particles one at a time. Prints the median µs per
particle of ``log_weights(num_particles=S)`` without gradients (what ``kl_gap`` and the command
line's report draw) over repeats.

    OMP_NUM_THREADS=1 python benchmarks/vmap_particle_cost.py --particles 256 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import pyro
import pyro.distributions as dist
import torch
from torch import nn

import pyro_elbo

T, N, STEPS, HIDDEN = 8, 50, 3, 32


def _mix_weights(beta: torch.Tensor) -> torch.Tensor:
    rest = (1 - beta).cumprod(-1)
    return nn.functional.pad(beta, (0, 1), value=1.0) * nn.functional.pad(rest, (1, 0), value=1.0)


def dp_model(x: torch.Tensor) -> None:
    with pyro.plate("sticks", T - 1):
        beta = pyro.sample("beta", dist.Beta(1.0, 1.5))
    with pyro.plate("components", T):
        mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
    with pyro.plate("data", N):
        z = pyro.sample("z", dist.Categorical(_mix_weights(beta)))
        pyro.sample("obs", dist.Normal(mu[z], 1.0), obs=x)


def dp_guide(x: torch.Tensor) -> None:
    kappa = pyro.param("kappa", lambda: torch.ones(T - 1), constraint=dist.constraints.positive)
    tau = pyro.param("tau", lambda: torch.linspace(-2.0, 2.0, T))
    phi = pyro.param("phi", lambda: torch.ones(N, T) / T, constraint=dist.constraints.simplex)
    with pyro.plate("sticks", T - 1):
        pyro.sample("beta", dist.Beta(torch.ones(T - 1), kappa))
    with pyro.plate("components", T):
        pyro.sample("mu", dist.Normal(tau, 1.0))
    with pyro.plate("data", N):
        pyro.sample("z", dist.Categorical(phi))


CELL, HEAD = nn.LSTMCell(2, HIDDEN), nn.Linear(HIDDEN, 2)


def rnn_model(x: torch.Tensor) -> None:
    with pyro.plate("data", N):
        present, total = torch.ones(N), torch.zeros(N)
        for t in range(STEPS):
            present = pyro.sample(f"z_pres_{t}", dist.Bernoulli(0.5 * present))
            where = pyro.sample(f"z_where_{t}", dist.Normal(0.0, 1.0))
            total = total + present * where
        pyro.sample("obs", dist.Normal(total, 1.0), obs=x)


def rnn_guide(x: torch.Tensor) -> None:
    pyro.module("cell", CELL)
    pyro.module("head", HEAD)
    state = (torch.zeros(N, HIDDEN), torch.zeros(N, HIDDEN))
    previous, present = torch.zeros(N), torch.ones(N)
    with pyro.plate("data", N):
        for t in range(STEPS):
            state = CELL(torch.stack([x, previous], -1), state)
            out = HEAD(state[0])
            present = pyro.sample(f"z_pres_{t}", dist.Bernoulli(logits=out[:, 0]).mask(present.bool()))
            previous = pyro.sample(f"z_where_{t}", dist.Normal(out[:, 1], 1.0))


PROGRAMS = {"dp_mixture (Beta)": (dp_model, dp_guide), "air_like (LSTMCell)": (rnn_model, rnn_guide)}


def per_particle_us(model: object, guide: object, path: str, particles: int, repeats: int) -> float:
    x = torch.linspace(-3.0, 3.0, N)
    pyro.clear_param_store()
    seconds = []
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first call guesses plate nesting and creates parameters
            start = time.perf_counter()
            pyro_elbo.log_weights(model, guide, x, num_particles=particles, vectorize_particles=path)
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[1:]) / particles * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    warnings.simplefilter("ignore")
    print(f"µs per particle, log_weights(num_particles={options.particles}), median of {options.repeats}")
    print(f"{'program':24} {'sequential':>12} {'vmap':>12} {'speed-up':>9}")
    for name, (model, guide) in PROGRAMS.items():
        sequential = per_particle_us(model, guide, "sequential", options.particles, options.repeats)
        vmapped = per_particle_us(model, guide, "vmap", options.particles, options.repeats)
        print(f"{name:24} {sequential:12.1f} {vmapped:12.1f} {sequential / vmapped:8.1f}x")


if __name__ == "__main__":
    main()
