"""Worker for the torch.distributed tests (run by tests/test_distributed.py under torchrun; not
collected). Writes OUT/rank{r}.pt with the fitted parameters and history.

usage: torchrun --nproc_per_node=N distributed_child.py OUT --batch B [--epochs E]
       [--objective map|stochastic] [--checkpoint PATH] [--resume] [--sigterm-launcher-at STEP]

``--sigterm-launcher-at`` makes rank 1 send SIGTERM to torchrun (its parent) at that step, as a
scheduler preempting the job does; every rank writes the steps it took to OUT/steps{r}.txt and
``--pace`` sleeps that long after each step.

Mistakes a data-parallel user makes (each rank reads ``RANK`` before ``fit``): ``--rows-by-rank
A,B`` gives rank r only the first rows[r] rows; ``--local-param`` adds a parameter sized by the
rank; ``--stream STEPS`` passes each rank its own IterableDataset and ``num_steps=STEPS``;
``--stall-at STEP`` stops rank 1 for a minute at that step and ``--timeout S`` is fit's
``process_group_timeout``.

``--exit-check`` registers, before ``fit``, an ``atexit`` hook (it runs after the package's own)
that writes the names of the rank's threads still alive to OUT/threads{r}.txt.
``--starve-gloo-workers`` (Linux) pins every thread of the rank to one CPU, the same for all ranks,
at the first step and puts Gloo's worker threads in the idle scheduling class: a worker then runs
only when nothing else on that CPU wants to, and it releases the last collective's tensors late,
often while the interpreter exits, as a worker does now and then on a loaded machine.
"""

from __future__ import annotations

import argparse
import atexit
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


class RankStream(torch.utils.data.IterableDataset):
    """Rank r's rows r, r + 2, r + 4, ... of the data, as a stream (no __len__)."""

    def __init__(self, rank, data):
        self.rank, self.data = rank, data

    def __iter__(self):
        return ((torch.tensor(i), self.data[i]) for i in range(self.rank, N, 2))


def with_local_param(guide, rank):
    """The guide plus a parameter sized by the rank (as one sized by the rank's own data)."""

    def local_guide(idx, x):
        pyro.param("local_w", torch.zeros(3 + rank))
        return guide(idx, x)

    return local_guide


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
    parser.add_argument("--rows-by-rank")
    parser.add_argument("--local-param", action="store_true")
    parser.add_argument("--stream", type=int)
    parser.add_argument("--stall-at", type=int)
    parser.add_argument("--timeout", type=float)
    parser.add_argument("--exit-check", action="store_true")
    parser.add_argument("--starve-gloo-workers", action="store_true")
    args = parser.parse_args()
    env_rank = int(os.environ.get("RANK", "0"))
    torch.set_default_dtype(torch.float64)
    out = Path(args.out)
    data = torch.linspace(-2, 3, N) ** 2
    rows = int(args.rows_by_rank.split(",")[env_rank]) if args.rows_by_rank else N
    dataset = torch.utils.data.TensorDataset(torch.arange(rows), data[:rows])
    if args.stream is not None:
        dataset = RankStream(env_rank, data)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch, shuffle=args.objective != "map" and args.stream is None
    )

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
            if args.starve_gloo_workers:
                starve_gloo_workers()
        with open(out / f"steps{rank}.txt", "a") as steps:
            steps.write(f"{step}\n")
        if step == args.sigterm_launcher_at and rank == 1:
            os.kill(os.getppid(), signal.SIGTERM)
        time.sleep(args.pace)
        if step == args.stall_at and rank == 1:
            time.sleep(60)

    if args.exit_check:
        atexit.register(write_thread_names, out / f"threads{env_rank}.txt")
    if args.objective == "map":
        guide, objective = AutoDelta(model), pyro_elbo.ELBO()
    else:
        guide, objective = AutoNormal(model), pyro_elbo.ELBO(num_particles=4)
    if args.local_param:
        guide = with_local_param(guide, env_rank)
    result = pyro_elbo.fit(
        model,
        guide,
        loader,
        objective=objective,
        num_epochs=args.epochs if args.stream is None else None,
        num_steps=args.stream,
        process_group_timeout=args.timeout,
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


def starve_gloo_workers():
    cpu = min(os.sched_getaffinity(0))
    for task in Path("/proc/self/task").iterdir():
        os.sched_setaffinity(int(task.name), {cpu})
        if (task / "comm").read_text().strip() == "pt_gloo_runloop":
            os.sched_setscheduler(int(task.name), os.SCHED_IDLE, os.sched_param(0))


def write_thread_names(path):
    """The names of this process's threads (Linux: /proc/self/task), one per line."""
    names = [(task / "comm").read_text().strip() for task in Path("/proc/self/task").iterdir()]
    path.write_text("\n".join(sorted(names)) + "\n")


if __name__ == "__main__":
    main()
