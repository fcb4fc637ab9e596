"""Worker for the torch.distributed tests (run by tests/test_distributed.py under torchrun; not
collected). Writes OUT/rank{r}.pt with the fitted parameters and history.

usage: torchrun --nproc_per_node=N distributed_child.py OUT --batch B [--epochs E]
       [--objective map|stochastic] [--checkpoint PATH] [--resume] [--sigterm-launcher-at STEP]

``--sigterm-launcher-at`` makes rank 1 send SIGTERM to torchrun (its parent) at that step, as a
scheduler preempting the job does; every rank writes the steps it took to OUT/steps{r}.txt and
``--pace`` sleeps that long after each step.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoDelta, AutoNormal

import pyro_elbo
from pyro_elbo.train import checkpoint

N = 32


def model(idx, x):
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    log_scale = pyro.sample("log_scale", dist.Normal(0.0, 2.0))
    with pyro.plate("data", N, subsample=idx):
        pyro.sample("x", dist.Normal(loc, log_scale.exp()), obs=x)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--objective", default="map")
    parser.add_argument("--checkpoint")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--sigterm-launcher-at", type=int)
    parser.add_argument("--pace", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    out = Path(args.out)
    data = torch.linspace(-2, 3, N) ** 2
    dataset = torch.utils.data.TensorDataset(torch.arange(N), data)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=args.objective != "map")

    real_save = checkpoint.save_checkpoint

    def marking_save(path, state):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        (out / f"wrote_checkpoint_rank{rank}").touch()
        real_save(path, state)

    checkpoint.save_checkpoint = marking_save  # what the Checkpointer hook calls
    draws = []

    def record(step, loss):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if step == 1:
            draws.append(torch.rand(2))
        with open(out / f"steps{rank}.txt", "a") as steps:
            steps.write(f"{step}\n")
        if step == args.sigterm_launcher_at and rank == 1:
            os.kill(os.getppid(), signal.SIGTERM)
        time.sleep(args.pace)

    if args.objective == "map":
        guide, objective = AutoDelta(model), pyro_elbo.ELBO()
    else:
        guide, objective = AutoNormal(model), pyro_elbo.ELBO(num_particles=4)
    result = pyro_elbo.fit(
        model,
        guide,
        loader,
        objective=objective,
        num_epochs=args.epochs,
        lr=0.05,
        seed=0,
        progress=False,
        checkpoint=args.checkpoint,
        checkpoint_every=3,
        resume=args.resume,
        callbacks=[record],
    )
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    torch.save({"params": result.params, "history": result.history, "draws": draws}, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
