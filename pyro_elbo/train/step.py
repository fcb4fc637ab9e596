"""One optimizer step of a :class:`~pyro_elbo.train.TrainState`: ``state.stepper`` takes it (eager,
compiled, or compiled with Adam in the graph: :mod:`pyro_elbo.train.steppers`); non-finite steps
are refused (naming the site) or skipped, at once or when a deferred verdict is settled."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from pyro_elbo._random import torch_rng_state
from pyro_elbo.train.nonfinite import find_nonfinite_site, refuse_or_skip
from pyro_elbo.train.state import TrainState
from pyro_elbo.train.steppers import add_new_params

__all__ = ["StepInfo", "step", "find_nonfinite_site", "default_device", "add_new_params"]


class StepInfo:
    """What one :func:`step` did.

    Attributes:
        step: steps taken so far, this one included.
        loss: the loss (averaged over processes under ``torch.distributed``); NaN/inf if skipped.
            On the compiled path it is read from the device only when asked for.
        finite: the loss and every gradient were finite, so the parameters were updated. On the
            compiled path it is read from the device only when asked for (and is False for the
            steps after a refused one, up to the next read of the ledger, which raises).
        seconds: wall-clock time of the step (the GPU synchronized; on the flat compiled path on a
            GPU only with ``state.settle_every == 1``, else the host's time, whose mean over many
            steps is the GPU's pace once its queue is full).
        compile_seconds: set on the step that captured and compiled the graph (``compile=True``).
    """

    __slots__ = ("step", "_loss", "_finite", "seconds", "compile_seconds")

    def __init__(
        self,
        step: int,
        loss: float | Tensor,
        finite: bool | Tensor,
        seconds: float,
        compile_seconds: float | None = None,
    ) -> None:
        self.step, self._loss, self._finite = step, loss, finite
        self.seconds, self.compile_seconds = seconds, compile_seconds

    @property
    def finite(self) -> bool:
        if isinstance(self._finite, Tensor):  # a 0-d tensor of the compiled step: read once
            self._finite = bool(self._finite)
        return self._finite

    @property
    def loss(self) -> float:
        if isinstance(self._loss, Tensor):  # a 0-d tensor of the compiled step: read once
            self._loss = float(self._loss)
        return self._loss

    def __repr__(self) -> str:
        return (
            f"StepInfo(step={self.step}, loss={self.loss}, finite={self.finite}, seconds={self.seconds}, "
            f"compile_seconds={self.compile_seconds})"
        )


def step(state: TrainState, *args: Any, **kwargs: Any) -> tuple[TrainState, StepInfo]:
    """One optimizer step on ``args`` (default: the args given to :func:`~pyro_elbo.train.init`)
    and ``kwargs`` (merged over init's). Parameters and optimizer state are updated in place and
    the state is returned, with what the step did.

    A step whose loss or gradient is not finite changes no parameter and no optimizer state; with
    ``on_nonfinite="raise"`` it raises :class:`~pyro_elbo.NonFiniteLossError` naming the first
    site whose log-density is not finite, with ``"skip"`` it is counted in ``state.num_skipped``
    (on the eager path also a step that Pyro's validation refuses for NaN values in a
    distribution, which it raises before a loss exists).
    To name the site the step is replayed: with the step's own draws on the eager path (and
    ``compile_backend="eager"``, whose draws are the eager ones), else at the parameters before
    the step with new draws (an inductor graph's draws cannot be replayed).

    On the compiled Adam path (:mod:`pyro_elbo.compile.flat`) the step is one graph call that
    writes parameters and Adam moments (on CUDA one copy follows) and reads nothing back: the
    loss and ``info.finite`` stay device tensors until read, and non-finite steps are refused or
    skipped inside the graph (:func:`~pyro_elbo.compile.adam.guarded_step`). The host reads that
    ledger every ``state.settle_every`` steps (:func:`~pyro_elbo.train.nonfinite.settle`; 256 by
    default, 1 with a scheduler or ``compile_backend="eager"``): a refused step then raises up to
    that many steps later, for that step, its data and its number, with the parameters, optimizer
    state and the run's record as they were before it.

    Raises:
        NonFiniteLossError: see above, or ``max_consecutive_skips`` non-finite steps in a row.
    """
    args = args if args else state.args
    kwargs = {**state.kwargs, **kwargs} if kwargs else state.kwargs
    stepper = state.stepper
    # the pre-step random state lets a refused step replay its draws (when they can be replayed)
    rng_before = torch_rng_state() if state.on_nonfinite == "raise" and stepper.replayable else None
    start = time.perf_counter()
    device = state.device
    if device is None or device.type == "cpu":  # (default_device's nullcontext, without entering it)
        loss, ok = stepper(state, args, kwargs)
    else:
        with _default_device(device):
            loss, ok = stepper(state, args, kwargs)
    compile_seconds = None
    if state.compile_seconds is None:
        compile_seconds = state.compile_seconds = stepper.compile_seconds()
    deferred = stepper.deferred  # the verdict is on the device: the stepper refuses or skips at settle
    if deferred:
        state.unsettled.append((state.position.step, args, kwargs, loss))
    elif not ok:
        refuse_or_skip(state, float(loss), args, kwargs, rng_before)
    else:
        state.consecutive_skips = 0
    if device is not None and device.type == "cuda" and (not deferred or state.settle_every == 1):
        torch.cuda.synchronize(device)  # (a deferred step waits for nothing: its seconds are the host's)
    seconds = time.perf_counter() - start
    state.step_seconds.append(seconds)
    state.record_loss(loss)
    state.position.step += 1
    if deferred and (
        len(state.unsettled) >= state.settle_every or (args is not state.args and _holds_other_data(state, args))
    ):
        stepper.settle(state, rng_before)  # rewinds the record to before a refused step, and raises
    if state.scheduler is not None and (not deferred or bool(ok)):
        state.scheduler.step()  # (init sets settle_every=1 with a scheduler: the ledger was read)
    return state, StepInfo(state.position.step, loss, ok, seconds, compile_seconds)


#: the most memory (bytes) of minibatches kept for steps whose ledger is not read yet
UNSETTLED_DATA_BYTES = 64 * 2**20


def _holds_other_data(state: TrainState, args: tuple[Any, ...]) -> bool:
    """Minibatch steps keep their batch until the ledger is read (to name the failing site on its
    data): read it before they hold more than :data:`UNSETTLED_DATA_BYTES`."""
    if args is state.args:
        return False
    state.unsettled_bytes += sum(a.nbytes for a in args if isinstance(a, Tensor))
    return state.unsettled_bytes > UNSETTLED_DATA_BYTES


def default_device(device: torch.device | None) -> contextlib.AbstractContextManager[None]:
    """On an accelerator, tensors the model creates (plate subsample indices, constants) default
    to it. Not on CPU, where it is a ``nullcontext`` (the step's hot path enters it every step:
    no generator, no device switch)."""
    if device is None or device.type == "cpu":
        return contextlib.nullcontext()
    return _default_device(device)


@contextlib.contextmanager
def _default_device(device: torch.device) -> Iterator[None]:
    previous = torch.get_default_device()
    torch.set_default_device(device)
    try:
        yield
    finally:
        torch.set_default_device(previous)
