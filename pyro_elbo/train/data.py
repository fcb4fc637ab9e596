"""Data order for :func:`~pyro_elbo.train.fit`: full-batch args or a ``DataLoader`` (sharded
across processes under ``torch.distributed``), with a position that a checkpoint records so that a
resumed run sees the same batches in the same order."""

from __future__ import annotations

import math
import numbers
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pyro_elbo import distributed
from pyro_elbo._random import forked_rng, rng_state, set_rng_state

#: steps when neither ``num_steps`` nor ``num_epochs`` is given
DEFAULT_STEPS = 1000


def check_count(name: str, value: Any, least: int) -> None:
    """``value`` is ``None`` or an int ``>= least`` (``num_steps=2.5`` or ``"100"`` are refused,
    not rounded or compared as text).

    Raises:
        TypeError: not an int. ValueError: below ``least``.
    """
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < least:
        raise ValueError(f"{name} must be >= {least}, got {value}")


def check_not_a_stream(args: tuple[Any, ...]) -> None:
    """Refuse batches passed where the model's args go: an iterator or generator (e.g.
    ``iter(loader)``), or a list/tuple of batches (each a tuple of tensors).

    Raises:
        TypeError: naming what was passed and what to pass instead.
    """
    if len(args) != 1:
        return
    (arg,) = args
    advice = (
        "; fit passes args to the model as they are. Pass a torch.utils.data.DataLoader (fit iterates it for "
        "num_epochs, shards it across processes and resumes it mid-epoch), or the model's tensors themselves"
    )
    if isinstance(arg, Iterator):
        raise TypeError(f"fit got an iterator ({type(arg).__name__}) as the model's only argument" + advice)
    if isinstance(arg, (list, tuple)) and arg and all(isinstance(b, (tuple, list)) for b in arg):
        if all(isinstance(t, Tensor) for b in arg for t in b):
            raise TypeError(
                f"fit got a {type(arg).__name__} of {len(arg)} batches as the model's only argument" + advice
            )


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


#: passes over a stream of unknown length (``num_steps`` ends the run first)
UNBOUNDED_EPOCHS = 2**62


def sized_length(loader: torch.utils.data.DataLoader[Any]) -> int | None:
    """``len(loader)``, or ``None`` for an ``IterableDataset`` without ``__len__``."""
    try:
        return len(loader)
    except TypeError:
        return None


def describe(loader: torch.utils.data.DataLoader[Any]) -> str:
    try:
        rows = f"{len(loader.dataset)} rows"  # type: ignore[arg-type]
    except TypeError:
        rows = f"a {type(loader.dataset).__name__}"
    return f"{rows}, batch_size={loader.batch_size}, drop_last={loader.drop_last}"


def check_rank_stream(num_steps: int | None, num_epochs: int | None) -> None:
    """Under ``torch.distributed`` an ``IterableDataset`` cannot be sharded by index: each rank's
    loader must yield that rank's part, and every rank must take the same number of steps.

    Raises:
        ValueError: without ``num_steps`` (or with ``num_epochs``), with what to do.
    """
    if num_steps is None or num_epochs is not None:
        raise ValueError(
            "under torch.distributed a DataLoader over an IterableDataset is used as each rank's own stream "
            "(fit cannot shard it by index): make it yield this rank's part (torch.distributed.get_rank()) and "
            "pass num_steps=N without num_epochs, so that every rank takes N steps"
        )


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
        per_epoch = 0
        if loaders:
            if len(args) != 1:
                raise ValueError("pass a DataLoader as the only positional argument after model and guide")
            loader = loaders[0]
            stream = isinstance(loader.dataset, torch.utils.data.IterableDataset)
            if stream and context.active:
                check_rank_stream(num_steps, num_epochs)
            self.loader = distributed.shard_loader(loader, context) if context.active and not stream else loader
            self.num_epochs = num_epochs if num_epochs is not None else 1
            length = sized_length(self.loader)
            if length is None:  # a stream of unknown length: num_steps, over as many passes as it takes
                if num_steps is None:
                    raise ValueError(
                        "the DataLoader's IterableDataset has no len(), so fit cannot count epochs: pass num_steps"
                    )
                self.num_epochs = num_epochs if num_epochs is not None else UNBOUNDED_EPOCHS
            elif context.active and not stream:
                per_epoch = distributed.agree_steps_per_epoch(length, context)
            else:
                per_epoch = length
            if length == 0 or (length is not None and per_epoch == 0):  # (every rank raises)
                raise ValueError(
                    f"the DataLoader yields no batches (len(loader) == 0: {describe(self.loader)}); "
                    "pass a smaller batch_size or drop_last=False"
                )
            self.total_steps = self.num_epochs * per_epoch
            if num_epochs is None and num_steps is None:
                num_steps = DEFAULT_STEPS
            if num_steps is not None:
                self.total_steps = (
                    min(num_steps, self.total_steps) if per_epoch and num_epochs is not None else num_steps
                )
                self.num_epochs = math.ceil(self.total_steps / per_epoch) if per_epoch else self.num_epochs
        else:
            check_not_a_stream(args)
            if num_epochs is not None:
                raise ValueError("num_epochs needs a DataLoader; with tensors use num_steps")
            self.num_epochs = 0
            self.total_steps = DEFAULT_STEPS if num_steps is None else num_steps
        self.device = device
        self.args = to_device(args, device) if self.loader is None else ()
        #: batches taken per epoch (all of them, unless the ranks' loaders differ in length)
        self.per_epoch = per_epoch if self.loader is not None else 0

    def peek(self) -> tuple[Any, ...]:
        """The first batch (without moving the caller's random stream)."""
        if self.loader is None:
            return self.args
        with forked_rng():
            first = next(iter(self.loader), None)
        if first is None:
            raise ValueError(f"the DataLoader yields no batches ({describe(self.loader)})")
        return to_device(as_args(first), self.device)

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
            if self.per_epoch and position.batch_in_epoch >= self.per_epoch:
                break
            position.batch_in_epoch += 1
            yield to_device(as_args(batch), self.device)
        if position.batch_in_epoch == 0:
            raise ValueError(f"the DataLoader yielded no batches in epoch {position.epoch} ({describe(loader)})")
        return True
