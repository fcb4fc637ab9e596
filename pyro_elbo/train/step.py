"""One optimizer step of a :class:`~pyro_elbo.train.TrainState`: eager, compiled, or compiled with
Adam in the graph; non-finite steps refused (naming the site) or skipped."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from pyro_elbo import distributed
from pyro_elbo._pyro.log_weights import log_weights
from pyro_elbo._pyro.params import loss_and_params
from pyro_elbo._random import set_torch_rng_state, torch_rng_state
from pyro_elbo.compiled import adam_step, all_finite
from pyro_elbo.train.flat import FlatAdam
from pyro_elbo.train.result import NonFiniteLossError
from pyro_elbo.train.state import TrainState


class StepInfo:
    """What one :func:`step` did.

    Attributes:
        step: steps taken so far, this one included.
        loss: the loss (averaged over processes under ``torch.distributed``); NaN/inf if skipped.
            On the compiled path it is read from the device only when asked for.
        finite: the loss and every gradient were finite, so the parameters were updated.
        seconds: wall-clock time of the step (the GPU synchronized).
        compile_seconds: set on the step that captured and compiled the graph (``compile=True``).
    """

    __slots__ = ("step", "_loss", "finite", "seconds", "compile_seconds")

    def __init__(
        self, step: int, loss: float | Tensor, finite: bool, seconds: float, compile_seconds: float | None = None
    ) -> None:
        self.step, self._loss, self.finite = step, loss, finite
        self.seconds, self.compile_seconds = seconds, compile_seconds

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
    site whose log-density is not finite, with ``"skip"`` it is counted in ``state.num_skipped``.
    To name the site the step is replayed: with the step's own draws on the eager path (and
    ``compile_backend="eager"``, whose draws are the eager ones), else at the parameters before
    the step with new draws (an inductor graph's draws cannot be replayed).

    On the compiled Adam path (:mod:`pyro_elbo.train.flat`) the step is one graph call that
    writes parameters and Adam moments (on CUDA one copy follows); the loss stays a device tensor
    until read (``info.loss``, ``state.history``), and the host reads only ``finite``.

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
    if not ok:
        _refuse_or_skip(state, float(loss), args, kwargs, rng_before)
    else:
        state.consecutive_skips = 0
        if state.scheduler is not None:
            state.scheduler.step()
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    state.step_seconds.append(seconds)
    state.record_loss(loss)
    state.position.step += 1
    return state, StepInfo(state.position.step, loss, ok, seconds, compile_seconds)


def _refuse_or_skip(
    state: TrainState, loss: float, args: tuple[Any, ...], kwargs: dict[str, Any], rng: dict[str, Any] | None
) -> None:
    if state.on_nonfinite == "raise":
        culprit = find_nonfinite_site(state, args, kwargs, rng)
        raise NonFiniteLossError(
            f"step {state.step}: the loss or its gradient is not finite ({loss}){culprit}; "
            "parameters and optimizer state were left as before this step. Pass "
            "on_nonfinite='skip' to skip such steps."
        )
    state.consecutive_skips += 1
    state.num_skipped += 1
    if state.consecutive_skips >= state.max_consecutive_skips:
        raise NonFiniteLossError(
            f"{state.consecutive_skips} consecutive non-finite steps (last at step {state.step}); "
            "stopping. Lower the learning rate or check the data."
        )


def _update(state: TrainState, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[float | Tensor, bool]:
    """Loss, gradients and (if everything is finite) the optimizer step; returns (loss, finite)."""
    compiled, params, opt = state.compiled, state.params, state.optimizer
    if compiled is not None and compiled.adam:
        flat = state.flat
        if flat is None or not flat.valid(params, opt):
            flat = state.flat = FlatAdam.bind(params, opt)
        if flat is not None:
            lean = flat.step(compiled, opt.param_groups[0], args, kwargs)
            if lean is not None:
                return lean[0], bool(lean[1])
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
        loss, seen = loss_and_params(lambda: objective.differentiable_loss(model, guide, *args, **kwargs))
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


def find_nonfinite_site(
    state: TrainState, args: tuple[Any, ...], kwargs: dict[str, Any], rng: dict[str, Any] | None
) -> str:
    """Name the first site whose log-density is not finite: replaying the failed step's draws
    (``rng``, the random state before it), or, without it, drawing anew at the parameters the
    failed step left unchanged (the message says which)."""
    objective, model, guide = state.objective, state.model, state.guide
    saved = torch_rng_state()
    how = "" if rng is not None else " (found by re-running the step at the parameters before it with new draws)"
    try:
        if rng is not None:
            set_torch_rng_state(rng)
        with torch.no_grad():
            lw = log_weights(
                model,
                guide,
                *args,
                num_particles=objective.num_particles,
                max_plate_nesting=objective.plate_nesting(model, guide, args, kwargs),
                vectorize_particles=objective.vectorize_particles,
                need={"per_site"},
                **kwargs,
            )
    except Exception as error:  # the replay itself failed: report that
        return f" (replaying the step raised {type(error).__name__}: {error})"
    finally:
        set_torch_rng_state(saved)
    for role, sites in (("model", lw.site_log_p), ("guide", lw.site_log_q)):
        for name, value in sites.items():
            if not torch.isfinite(value).all():
                return f"; the {role} site '{name}' has a non-finite log-density{how}"
    return f"; every site's log-density is finite, so the gradient overflowed{how}"


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
