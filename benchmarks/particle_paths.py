"""Cost per particle of the three particle paths (plate, vmap, sequential), side by side in one run.

The model is a Bayesian linear regression written for one sample (``x @ w``), so only vmap and
sequential can run it; the plate row uses the same model written with ``w[..., None, :]`` so that
it broadcasts. Prints the median µs per particle of ``IWAE(num_particles=S).loss`` over repeats.

    OMP_NUM_THREADS=1 python benchmarks/particle_paths.py --particles 64 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import pyro
import pyro.distributions as dist
import torch

import pyro_elbo

N, D = 12, 3


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    return x, x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)


def unbatched(x: torch.Tensor, y: torch.Tensor) -> None:
    w = pyro.sample("w", dist.Normal(torch.zeros(D, dtype=x.dtype), 1.0).to_event(1))
    with pyro.plate("data", N):
        pyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)


def batched(x: torch.Tensor, y: torch.Tensor) -> None:
    w = pyro.sample("w", dist.Normal(torch.zeros(D, dtype=x.dtype), 1.0).to_event(1))
    with pyro.plate("data", N):
        pyro.sample("y", dist.Normal((x * w).sum(-1), 0.5), obs=y)


def guide(x: torch.Tensor, y: torch.Tensor) -> None:
    pyro.sample("w", dist.Normal(torch.zeros(D, dtype=x.dtype), 0.5).to_event(1))


def time_path(model: object, path: str, particles: int, repeats: int) -> float:
    x, y = data()
    objective = pyro_elbo.IWAE(num_particles=particles, vectorize_particles=path)
    objective.loss(model, guide, x, y)  # warm: plate nesting guessed, path decided
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        objective.loss(model, guide, x, y)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds) / particles * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore", pyro_elbo.ParticlePathWarning)
    rows = [("plate", batched), ("vmap", unbatched), ("sequential", unbatched)]
    results = {path: time_path(model, path, args.particles, args.repeats) for path, model in rows}
    print(f"| path | µs per particle ({args.particles} particles, median of {args.repeats}) | vs plate |")
    print("|---|---|---|")
    for path, value in results.items():
        print(f"| {path} | {value:.1f} | {value / results['plate']:.1f}x |")


if __name__ == "__main__":
    main()
