"""One optimizer step of a :class:`~pyro_elbo.train.TrainState`: eager, compiled, or compiled with
Adam in the graph; non-finite steps refused (naming the site) or skipped."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from pyro_elbo import distributed
from pyro_elbo._pyro.params import loss_and_params
from pyro_elbo._random import torch_rng_state
from pyro_elbo.compiled import adam_step, all_finite
from pyro_elbo.train.flat import FlatAdam
from pyro_elbo.train.nonfinite import find_nonfinite_site, refuse_or_skip, settle
from pyro_elbo.train.state import TrainState

__all__ = ["StepInfo", "step", "find_nonfinite_site", "default_device"]


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

    On the compiled Adam path (:mod:`pyro_elbo.train.flat`) the step is one graph call that
    writes parameters and Adam moments (on CUDA one copy follows) and reads nothing back: the
    loss and ``info.finite`` stay device tensors until read, and non-finite steps are refused or
    skipped inside the graph (:func:`~pyro_elbo.compiled.guarded_step`). The host reads that
    ledger every ``state.settle_every`` steps (:func:`~pyro_elbo.train.nonfinite.settle`; 256 by
    default, 1 with a scheduler or ``compile_backend="eager"``): a refused step then raises up to
    that many steps later, for that step, its data and its number, with the parameters, optimizer
    state and the run's record as they were before it.

    Raises:
        NonFiniteLossError: see above, or ``max_consecutive_skips`` non-finite steps in a row.
    """
    args = args if args else state.args
    kwargs = {**state.kwargs, **kwargs} if kwargs else state.kwargs
    compiled = state.compiled
    # the pre-step random state lets a refused step replay its draws (when they can be replayed)
    replayable = compiled is None or compiled.backend == "eager" or compiled.failed is not None
    rng_before = torch_rng_state() if state.on_nonfinite == "raise" and replayable else None
    start = time.perf_counter()
    device = state.device
    with default_device(device):
        loss, ok = _update(state, args, kwargs)
    compile_seconds = None
    if compiled is not None and state.compile_seconds is None and compiled.capture_seconds:
        compile_seconds = state.compile_seconds = sum(compiled.capture_seconds.values())
    lean = isinstance(ok, Tensor)  # the flat compiled step: its ledger refuses or skips on the device
    if lean:
        state.unsettled.append((state.step, args, kwargs, loss))
    elif not ok:
        refuse_or_skip(state, float(loss), args, kwargs, rng_before)
    else:
        state.consecutive_skips = 0
    if device is not None and device.type == "cuda" and (not lean or state.settle_every == 1):
        torch.cuda.synchronize(device)  # (the lean step waits for nothing: its seconds are the host's)
    seconds = time.perf_counter() - start
    state.step_seconds.append(seconds)
    state.record_loss(loss)
    state.position.step += 1
    if lean and (len(state.unsettled) >= state.settle_every or _holds_other_data(state, args)):
        settle(state, rng_before)  # rewinds the record to before a refused step, and raises
    if state.scheduler is not None and (not lean or bool(ok)):
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


def _update(state: TrainState, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[float | Tensor, bool | Tensor]:
    """Loss, gradients and (if everything is finite) the optimizer step; returns (loss, finite),
    both 0-d tensors on the flat compiled path (its ledger decides on the device)."""
    compiled, params, opt = state.compiled, state.params, state.optimizer
    if compiled is not None and compiled.adam:
        flat = state.flat
        limit = 1 if state.on_nonfinite == "raise" else state.max_consecutive_skips
        if flat is None or not flat.valid(params, opt, limit):
            settle(state)  # the old buffers' ledger, before they are dropped
            flat = state.flat = FlatAdam.bind(params, opt, limit)
        if flat is not None:
            lean = flat.step(compiled, opt.param_groups[0], args, kwargs)
            if lean is not None:
                return lean
        else:
            done = adam_step(compiled, params, opt, args, kwargs)
            if done is not None:
                return done
    out = compiled(params, args, kwargs) if compiled is not None and not compiled.adam else None
    finite: Tensor | None = None
    if out is not None:
        loss, finite, param_grads = out
        for param, grad in zip(params.values(), param_grads):
            param.grad = grad
    else:
        objective, model, guide = state.objective, state.model, state.guide
        try:
            loss, seen = loss_and_params(lambda: objective.differentiable_loss(model, guide, *args, **kwargs))
        except ValueError as error:  # Pyro's validation refuses NaN values: skipped like a NaN loss
            if state.on_nonfinite != "skip" or "found invalid values" not in str(error):
                raise
            loss, seen = torch.tensor(math.nan), {}
        add_new_params(seen, params, opt)
        opt.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
    if state.context.active:
        distributed.average_gradients(list(params.values()), state.context)
        loss = distributed.average_scalar(loss.detach(), state.context)
        finite = None
    if finite is None:
        finite = all_finite(loss.detach(), [p.grad for p in params.values() if p.grad is not None])
    loss_value = float(loss.detach())
    if not bool(finite):
        opt.zero_grad(set_to_none=True)
        return loss_value, False
    if state.clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(list(params.values()), state.clip_norm)
    opt.step()
    return loss_value, True


def add_new_params(seen: dict[str, Tensor], params: dict[str, Tensor], opt: torch.optim.Optimizer) -> None:
    """Parameters first read in this step (created lazily) join the optimizer in a new group."""
    known = {id(p) for p in params.values()}
    new = {name: leaf for name, leaf in seen.items() if name not in params and id(leaf) not in known}
    if new:
        params.update(new)
        opt.add_param_group({"params": list(new.values())})


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
