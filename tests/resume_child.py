"""Child process for the kill -9 / resume tests (run by tests/test_fit.py, not collected).

usage: python resume_child.py CHECKPOINT OUT [--kill-at STEP] [--kill-in-write STEP] [--resume]
       [--signal-at STEP --signal TERM|INT] [--pace SECONDS --trace FILE]

``--signal-at`` sends itself the signal at that step; ``--pace`` sleeps that long after each step
and ``--trace`` writes the steps taken to FILE as they are taken (for a signal sent from outside).
"""

from __future__ import annotations

import argparse
import os
import signal
import time

import pyro
import pyro.distributions as dist
import torch

import pyro_elbo
from pyro_elbo.train import checkpoint

N = 40


def model(idx, x):
    loc = pyro.param("prior_loc", torch.tensor(0.0))
    with pyro.plate("data", N, subsample=idx):
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        pyro.sample("x", dist.Normal(z, 0.5), obs=x)


def guide(idx, x):
    a = pyro.param("a", torch.tensor(0.1))
    s = pyro.param("s", torch.tensor(1.0), constraint=dist.constraints.positive)
    with pyro.plate("data", N, subsample=idx):
        pyro.sample("z", dist.Normal(a * x, s))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--kill-in-write", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--signal-at", type=int)
    parser.add_argument("--signal", choices=("TERM", "INT"), default="TERM")
    parser.add_argument("--pace", type=float, default=0.0)
    parser.add_argument("--trace")
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    data = torch.linspace(-2, 2, N)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.arange(N), data), batch_size=8, shuffle=True
    )

    if args.kill_in_write is not None:
        real_save = torch.save

        def dying_save(obj, f, *a, **k):
            if obj["step"] == args.kill_in_write:
                f.write(b"partial checkpoint bytes")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            real_save(obj, f, *a, **k)

        checkpoint.torch.save = dying_save  # what save_checkpoint calls

    def killer(step, loss):
        if step == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == args.signal_at:
            os.kill(os.getpid(), getattr(signal, f"SIG{args.signal}"))
        if args.trace is not None:
            with open(args.trace, "a") as trace:
                trace.write(f"{step}\n")
        time.sleep(args.pace)

    pyro.set_rng_seed(123)
    result = pyro_elbo.fit(
        model,
        guide,
        loader,
        objective=pyro_elbo.IWAE(num_particles=4),
        num_epochs=5,
        lr=0.05,
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5),
        checkpoint=args.checkpoint,
        checkpoint_every=5,
        resume=args.resume,
        progress=False,
        callbacks=[killer],
    )
    torch.save({"params": result.params, "history": result.history}, args.out)


if __name__ == "__main__":
    main()
