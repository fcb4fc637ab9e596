"""Data order for :func:`~pyro_elbo.train.fit`: full-batch args or a ``DataLoader`` (sharded
across processes under ``torch.distributed``), with a position that a checkpoint records so that a
resumed run sees the same batches in the same order."""

from __future__ import annotations

import math
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pyro_elbo import distributed
from pyro_elbo._random import forked_rng, rng_state, set_rng_state

#: steps when neither ``num_steps`` nor ``num_epochs`` is given
DEFAULT_STEPS = 1000


def as_args(batch: Any) -> tuple[Any, ...]:
    """A ``DataLoader`` batch as the model's positional args (a tuple or list is splatted)."""
    if isinstance(batch, (tuple, list)):
        return tuple(batch)
    return (batch,)


def to_device(args: tuple[Any, ...], device: torch.device | None) -> tuple[Any, ...]:
    """The tensors of ``args`` moved to ``device`` (everything as is if ``device`` is ``None``).

    To a GPU, a CPU tensor is first copied into page-locked memory (unless it is there already,
    e.g. from ``DataLoader(pin_memory=True)``): a ``non_blocking`` copy from pageable memory is not
    asynchronous (the driver stages it and may wait for the stream), one from pinned memory is, so
    the host prepares and sends
    batch :math:`k+1` while the GPU still runs step :math:`k` (the compiled step reads nothing
    back per step; :mod:`pyro_elbo.train.nonfinite`)."""
    if device is None:
        return args
    return tuple(_moved(a, device) if isinstance(a, Tensor) else a for a in args)


def _moved(tensor: Tensor, device: torch.device) -> Tensor:
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


@dataclass
class DataPosition:
    """Where a run is: optimizer steps taken, the epoch, batches taken in that epoch, and the
    random state the epoch's shuffle was drawn from (replayed on resume)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    epoch_rng: dict[str, Any] | None = None


class Data:
    """Full-batch args or a DataLoader, with resumable iteration order.

    Args:
        args: the model's args, or a single ``DataLoader``.
        num_steps: steps (default :data:`DEFAULT_STEPS`); with a ``DataLoader`` and ``num_epochs``, a cap
            on the total.
        num_epochs: passes over a ``DataLoader``.
        device: where batches are moved.
        context: the process group (a ``DataLoader`` is sharded across its ranks).
    """

    def __init__(
        self,
        args: tuple[Any, ...],
        num_steps: int | None,
        num_epochs: int | None,
        device: torch.device | None,
        context: distributed.Context,
    ) -> None:
        loaders = [a for a in args if isinstance(a, torch.utils.data.DataLoader)]
        self.loader: torch.utils.data.DataLoader[Any] | None = None
        if loaders:
            if len(args) != 1:
                raise ValueError("pass a DataLoader as the only positional argument after model and guide")
            self.loader = distributed.shard_loader(loaders[0], context) if context.active else loaders[0]
            self.num_epochs = num_epochs if num_epochs is not None else 1
            per_epoch = len(self.loader)
            self.total_steps = self.num_epochs * per_epoch
            if num_epochs is None and num_steps is None:
                num_steps = DEFAULT_STEPS
            if num_steps is not None:
                self.total_steps = min(num_steps, self.total_steps) if num_epochs is not None else num_steps
                self.num_epochs = math.ceil(self.total_steps / per_epoch) if per_epoch else self.num_epochs
        else:
            if num_epochs is not None:
                raise ValueError("num_epochs needs a DataLoader; with tensors use num_steps")
            self.num_epochs = 0
            self.total_steps = DEFAULT_STEPS if num_steps is None else num_steps
        self.device = device
        self.args = to_device(args, device) if self.loader is None else ()

    def peek(self) -> tuple[Any, ...]:
        """The first batch (without moving the caller's random stream)."""
        if self.loader is None:
            return self.args
        with forked_rng():
            return to_device(as_args(next(iter(self.loader))), self.device)

    def batches(self, position: DataPosition) -> Iterator[tuple[Any, ...]]:
        """The remaining batches from ``position``, which the caller advances by ``step``."""
        if self.loader is None:
            while position.step < self.total_steps:
                yield self.args
            return
        while position.step < self.total_steps and position.epoch < self.num_epochs:
            finished = yield from self._epoch(self.loader, position)
            if not finished:
                return
            position.epoch += 1
            position.batch_in_epoch = 0
            position.epoch_rng = None

    def _epoch(
        self, loader: torch.utils.data.DataLoader[Any], position: DataPosition
    ) -> Generator[tuple[Any, ...], None, bool]:
        """One epoch's remaining batches; returns whether the epoch ran to its end."""
        resuming = position.batch_in_epoch > 0 and position.epoch_rng is not None
        if resuming:
            current = rng_state()
            set_rng_state(position.epoch_rng)  # type: ignore[arg-type]
        else:
            position.epoch_rng = rng_state()
        distributed.set_epoch(loader, position.epoch)
        iterator = iter(loader)
        if resuming:
            for _ in range(position.batch_in_epoch):
                next(iterator)
            set_rng_state(current)
        for batch in iterator:
            if position.step >= self.total_steps:
                return False
            position.batch_in_epoch += 1
            yield to_device(as_args(batch), self.device)
        return True
