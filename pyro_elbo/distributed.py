"""Data-parallel training with ``torch.distributed`` (launched by ``torchrun``).

:func:`pyro_elbo.fit` calls these helpers. When the script runs under ``torchrun`` (the
``WORLD_SIZE``/``RANK`` environment) or inside a process group the user already initialized, each
process trains on its shard of the ``DataLoader`` and gradients are averaged, so ``N`` processes
with batch ``B`` follow the trajectory of one process with batch ``N * B``.

Exit. A process group that ``fit`` creates is destroyed when the interpreter begins to exit
(``atexit``), while Python is still whole. Gloo's worker threads keep the tensors of a finished
collective for a moment after the caller has moved on; when the caller's Python object of such a
tensor is gone by then, the worker's release of it takes the GIL. Destroying the group joins
those threads first. Left to the interpreter's teardown, a worker can reach the GIL after Python
has begun to finalize; CPython then ends the thread inside a C++ destructor, and the process
aborts ("terminate called without an active exception", exit code -6) after a run that
succeeded. For the destruction to free the group, no object may still hold it: see
:func:`_bind_group_defaults_to_none`.
"""

from __future__ import annotations

import atexit
import datetime
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler


@dataclass(frozen=True)
class Context:
    """The process group as ``fit`` sees it (``active=False`` for ordinary single-process runs)."""

    active: bool = False
    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ and "MASTER_ADDR" in os.environ


def setup(device: str | torch.device | None, timeout: float | None = None) -> Context:
    """Join (or initialize) the process group if this process is one of several.

    The backend is NCCL when CUDA is available and Gloo otherwise. Each process uses
    ``cuda:LOCAL_RANK`` on GPU machines unless ``device`` says otherwise. ``timeout`` (seconds)
    is how long a collective call waits for a stalled rank before it raises, when this call
    creates the process group (torch's default otherwise: 30 minutes for Gloo, 10 for NCCL).
    """
    if not dist.is_available():
        return Context()
    if not dist.is_initialized():
        if not _launched_by_torchrun():
            return Context()
        use_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        wait = None if timeout is None else datetime.timedelta(seconds=timeout)
        _bind_group_defaults_to_none()
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=wait)
        atexit.register(_release_process_group)
    world_size = dist.get_world_size()
    if world_size == 1:
        return Context()
    rank = dist.get_rank()
    if device is None:
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        else:
            device = torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Context(active=True, rank=rank, world_size=world_size, device=device)


def _release_process_group() -> None:
    """At interpreter exit, destroy the process group :func:`setup` created (a local call, no
    collective), which joins Gloo's worker threads while the interpreter can still serve them
    (see the module docstring)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # the interpreter is exiting: nothing left to tell
            pass


def _bind_group_defaults_to_none() -> None:
    """Import ``torch.distributed.nn.functional`` while no process group exists (once; a no-op
    afterwards).

    Its functions take ``group=group.WORLD`` as a default argument, and Python evaluates a default
    once, when the module is imported. torch imports that module lazily (building the first
    optimizer imports ``torch._dynamo``, which imports it); imported after
    ``init_process_group``, ten function defaults hold the default group, so
    ``destroy_process_group`` cannot free it and Gloo's threads live on into the interpreter's
    teardown. Imported first, the defaults are ``None``, which those functions read as the
    default group at call time: the same behaviour."""
    if dist.is_available() and not dist.is_initialized():
        try:
            import torch.distributed.nn.functional  # noqa: F401
        except ImportError:  # a build without it: nothing to bind
            pass


_bind_group_defaults_to_none()  # for a group the program creates itself after importing the package


def broadcast_params(params: dict[str, Tensor], ctx: Context) -> None:
    """Copy rank 0's (lazily created, then materialized) parameters to every rank, after
    :func:`check_same_params`."""
    check_same_params(params, ctx)
    with torch.no_grad():
        for param in params.values():
            dist.broadcast(param.data, src=0)


def check_same_params(params: dict[str, Tensor], ctx: Context) -> None:
    """Every rank has the same parameter names, shapes and dtypes (a collective call; each rank
    raises the same error). Otherwise the first all-reduce of gradients would mix unrelated
    buffers or abort the process ("collective mismatch").

    Raises:
        ValueError: naming the first differing parameter, both ranks and both shapes/dtypes.
    """
    mine = [(name, tuple(p.shape), str(p.dtype).removeprefix("torch.")) for name, p in params.items()]
    every: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(every, mine)
    reference = dict((name, (shape, dtype)) for name, shape, dtype in every[0])
    for rank, theirs in enumerate(every[1:], start=1):
        other = {name: (shape, dtype) for name, shape, dtype in theirs}
        for name in [n for n in reference if n in other and reference[n] != other[n]]:
            (shape0, dtype0), (shape, dtype) = reference[name], other[name]
            raise ValueError(
                f"parameter {name!r} has shape {shape0} ({dtype0}) on rank 0 but {shape} ({dtype}) on rank {rank}: "
                "data-parallel training needs the same parameters on every rank. A parameter sized by each rank's "
                "data (a local latent) cannot be averaged across ranks: size it by the whole data set and select "
                "the rows of a batch (pyro.plate(..., subsample=idx))."
            )
        if set(other) != set(reference):
            only0, only = sorted(set(reference) - set(other)), sorted(set(other) - set(reference))
            raise ValueError(
                f"the ranks have different parameters: only on rank 0: {only0}, only on rank {rank}: {only}; "
                "data-parallel training needs the same parameters on every rank (create them from data every "
                "rank has, not from the rank's own shard)"
            )


def agree_steps_per_epoch(steps: int, ctx: Context) -> int:
    """The fewest batches per epoch over the ranks (a collective call). Ranks with different
    numbers of batches would otherwise wait for each other at the end of the shortest epoch
    forever; a warning names every rank's count when they differ."""
    every: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(every, steps)
    fewest = min(every)
    if fewest != max(every) and ctx.is_main:
        counts = ", ".join(f"rank {r}: {n}" for r, n in enumerate(every))
        warnings.warn(
            f"the ranks' DataLoaders have different numbers of batches per epoch ({counts}); every rank takes "
            f"{fewest} per epoch so that they stay in step, and the rest of the longer shards is not used. Give every "
            "rank the same data set (fit shards one DataLoader across the ranks) to use all of it.",
            RuntimeWarning,
            stacklevel=4,
        )
    return int(fewest)


def seed_rank(ctx: Context) -> None:
    """Give each rank its own reproducible random stream for particle draws: rank 0's current
    stream picks a base seed, shared by all ranks, and rank ``r`` continues from ``base + r``."""
    base = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)
    base = base.to(ctx.device) if dist.get_backend() == "nccl" else base
    dist.broadcast(base, src=0)
    pyro.set_rng_seed(int(base.item()) + ctx.rank)


def average_gradients(params: list[Tensor], ctx: Context) -> None:
    """All-reduce the gradients (one flat buffer) and divide by the world size."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world_size
    offset = 0
    for param, grad in zip(params, grads):
        n = grad.numel()
        param.grad = flat[offset : offset + n].view_as(param).clone()
        offset += n


def average_scalar(value: Tensor, ctx: Context) -> Tensor:
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / ctx.world_size


def shard_loader(loader: DataLoader[Any], ctx: Context) -> DataLoader[Any]:
    """The same loader over this rank's shard (``DistributedSampler``; shuffled if the original was).

    Raises:
        ValueError: an ``IterableDataset`` or a custom ``batch_sampler``, which cannot be sharded
            by index (``fit`` uses a loader over an ``IterableDataset`` as each rank's own stream,
            with ``num_steps``, and never calls this for it).
    """
    if isinstance(loader.dataset, IterableDataset):
        raise ValueError(
            "a DataLoader over an IterableDataset cannot be sharded across processes by index; "
            "make the dataset yield each rank's part (torch.distributed.get_rank()) yourself and pass that "
            "loader to fit with num_steps (fit then uses it as the rank's own stream)"
        )
    if loader.batch_size is None:
        raise ValueError(
            "a DataLoader with a custom batch_sampler cannot be sharded; pass batch_size and shuffle instead"
        )
    if isinstance(loader.sampler, DistributedSampler):
        return loader
    with torch.random.fork_rng(devices=[]):  # leave the caller's stream where it was
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)
    seed = seed.to(ctx.device) if dist.get_backend() == "nccl" else seed
    dist.broadcast(seed, src=0)
    sampler: DistributedSampler[Any] = DistributedSampler(
        loader.dataset,
        num_replicas=ctx.world_size,
        rank=ctx.rank,
        shuffle=isinstance(loader.sampler, RandomSampler),
        seed=int(seed.item()),
        drop_last=loader.drop_last,
    )
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
    )


def set_epoch(loader: DataLoader[Any], epoch: int) -> None:
    """Reshuffle a distributed loader consistently across ranks for this epoch."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)


def gather_rng_states(ctx: Context, get_state: Callable[[], dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's random state, in rank order (a collective call: all ranks must call it)."""
    states: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(states, get_state())
    return states


def barrier(ctx: Context) -> None:
    if ctx.active:
        dist.barrier()


def max_over_ranks(value: Tensor, ctx: Context) -> Tensor:
    """The elementwise maximum of ``value`` over all ranks, on the CPU (a collective call)."""
    value = value.to(ctx.device) if dist.get_backend() == "nccl" else value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.cpu()


def agree_or_raise(ctx: Context, error: BaseException | None) -> None:
    """Raise ``error`` (found on rank 0) on every rank, so that no rank goes on to a collective
    the others never reach (a collective call)."""
    if not ctx.active:
        if error is not None:
            raise error
        return
    message: list[Any] = [f"{type(error).__name__}: {error}" if error is not None else None]
    dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        raise ValueError(f"rank 0 refused to start: {message[0]}")
