"""The implementations of one optimizer step, behind one protocol.

A :class:`Stepper` computes the loss and gradients and, when they are finite, applies the
optimizer update; :func:`~pyro_elbo.train.step` calls ``state.stepper`` and handles what every
path shares (the record, non-finite refusals, the scheduler). The implementations:

- :class:`EagerStep`: Pyro's program run eagerly, ``loss.backward()``, the optimizer's own step;
- :class:`CompiledGradients`: loss and gradients from one compiled graph
  (:class:`~pyro_elbo.compile.graph.CompiledLoss`), the optimizer's own step (any optimizer, gradient
  clipping);
- :class:`CompiledAdam`: loss, gradients and the Adam update of each parameter in one graph
  (a plain :class:`torch.optim.Adam`);
- :class:`FlatAdamStep`: the same on flat buffers (:mod:`pyro_elbo.compile.flat`), with the
  non-finite verdict kept on the device and read by :meth:`Stepper.settle` (``deferred``);
- :class:`AutoStep`: ``fit(compile="auto")``, two steppers and the one now in use
  (:class:`~pyro_elbo.train.autocompile.AutoCompile` decides which).

Each compiled stepper runs the step eagerly when its graph is not available (the capture failed,
warned once), so a stepper always takes the step. The path is chosen in one place,
:func:`stepper_for`, from what :func:`~pyro_elbo.train.init` built.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from pyro_elbo import distributed
from pyro_elbo._pyro.params import loss_and_params
from pyro_elbo.compile import CompiledLoss, FlatAdam, adam_step, all_finite
from pyro_elbo.compile.inductor import prepare_compile_fx
from pyro_elbo.compile.torch_internals import counting_operators
from pyro_elbo.train import background
from pyro_elbo.train.background import BackgroundCompile
from pyro_elbo.train.nonfinite import settle as settle_ledger

if TYPE_CHECKING:
    from pyro_elbo.train.state import TrainState

#: ``(loss, finite)``: floats/bools, or 0-d device tensors when the verdict is deferred
Outcome = tuple[float | Tensor, bool | Tensor]


class Stepper(Protocol):
    """One optimizer step of a :class:`~pyro_elbo.train.TrainState`.

    Attributes:
        deferred: the last call left its non-finite verdict on the device (its ``finite`` is a
            tensor that may not be read yet); :meth:`settle` acts on it later.
        replayable: a refused step's random draws can be replayed (to name the site) from the
            random state before it.
    """

    @property
    def deferred(self) -> bool: ...

    @property
    def replayable(self) -> bool: ...

    def __call__(self, state: TrainState, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Outcome:
        """The loss and whether it and every gradient were finite; the update is applied only when
        they were (a non-finite step changes no parameter and no optimizer state)."""
        ...

    def compile_seconds(self) -> float | None:
        """Seconds spent capturing and compiling so far (``None``: nothing compiled)."""
        ...

    def settle(self, state: TrainState, rng_of_last: dict[str, Any] | None = None) -> None:
        """Act on deferred non-finite verdicts now (count skips; raise for a refused step)."""
        ...

    def release(self, state: TrainState) -> None:
        """Give back what the stepper laid out (parameters in their own memory again)."""
        ...


class EagerStep:
    """Pyro's program run eagerly, ``loss.backward()``, the optimizer's own step."""

    deferred = False
    replayable = True

    def __call__(self, state: TrainState, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Outcome:
        objective, model, guide, params, opt = state.objective, state.model, state.guide, state.params, state.optimizer
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
        return apply_update(state, loss, None)

    def compile_seconds(self) -> float | None:
        return None

    def settle(self, state: TrainState, rng_of_last: dict[str, Any] | None = None) -> None:
        pass

    def release(self, state: TrainState) -> None:
        pass


class _Compiled:
    """What the compiled steppers share: the graph, the eager step they fall back to."""

    deferred = False

    def __init__(self, compiled: CompiledLoss) -> None:
        self.compiled = compiled
        self.eager = EagerStep()

    @property
    def replayable(self) -> bool:
        """The captured graph run uncompiled draws as the eager path does; after a failed capture
        the steps are eager."""
        return self.compiled.backend == "eager" or self.compiled.failed is not None

    def compile_seconds(self) -> float | None:
        return sum(self.compiled.capture_seconds.values()) if self.compiled.capture_seconds else None

    def settle(self, state: TrainState, rng_of_last: dict[str, Any] | None = None) -> None:
        pass

    def release(self, state: TrainState) -> None:
        pass


class CompiledGradients(_Compiled):
    """Loss and gradients from the compiled graph; the optimizer's own step (and clipping)."""

    def __call__(self, state: TrainState, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Outcome:
        out = self.compiled(state.params, args, kwargs)
        if out is None:
            return self.eager(state, args, kwargs)
        loss, finite, grads = out
        for param, grad in zip(state.params.values(), grads):
            param.grad = grad
        return apply_update(state, loss, finite)


class CompiledAdam(_Compiled):
    """Loss, gradients and each parameter's Adam update in one graph call
    (:func:`~pyro_elbo.compile.adam.adam_step`)."""

    def __call__(self, state: TrainState, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Outcome:
        done = adam_step(self.compiled, state.params, state.optimizer, args, kwargs)
        return self.eager(state, args, kwargs) if done is None else done


class FlatAdamStep(_Compiled):
    """Loss, gradients and the Adam update of all parameters on flat buffers
    (:class:`~pyro_elbo.compile.flat.FlatAdam`, kept in ``state.flat``), the non-finite ledger on
    the device; :class:`CompiledAdam` when the parameters cannot share one vector."""

    def __init__(self, compiled: CompiledLoss) -> None:
        super().__init__(compiled)
        self.per_parameter = CompiledAdam(compiled)

    def __call__(self, state: TrainState, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Outcome:
        self.deferred = False
        params, opt = state.params, state.optimizer
        limit = 1 if state.on_nonfinite == "raise" else state.max_consecutive_skips
        flat = state.flat
        if flat is None or not flat.valid(params, opt, limit):
            settle_ledger(state)  # the old buffers' ledger, before they are dropped
            flat = state.flat = FlatAdam.bind(params, opt, limit)
        if flat is None:
            return self.per_parameter(state, args, kwargs)
        lean = flat.step(self.compiled, opt.param_groups[0], args, kwargs)
        if lean is None:  # the graph is not available: eager (the capture warned)
            return self.eager(state, args, kwargs)
        self.deferred = True
        return lean

    def settle(self, state: TrainState, rng_of_last: dict[str, Any] | None = None) -> None:
        settle_ledger(state, rng_of_last)

    def release(self, state: TrainState) -> None:
        try:
            self.settle(state)
        finally:
            if state.flat is not None:
                state.flat.release()
                state.flat = None
            self.compiled.forget_inputs()  # the graph's last inputs: the released buffers


class AutoStep:
    """``fit(compile="auto")``: an eager and a compiled stepper, and the one in use
    (``use_compiled``, set by :class:`~pyro_elbo.train.autocompile.AutoCompile`). Switching
    happens between steps; both act on the same parameters and optimizer state, so the state is
    unchanged by a switch (a switch away from a flat stepper settles and releases its buffers)."""

    def __init__(self, eager: Stepper, compiled: Stepper) -> None:
        self.eager, self.compiled = eager, compiled
        self.use_compiled = False
        self.background: BackgroundCompile | None = None
        self.background_wanted = self.import_first = False
        #: seconds spent importing inductor before the fork (``None``: it was not imported then)
        self.import_seconds: float | None = None
        #: count the operators of the next step (:meth:`count_next_step`); their count, once taken
        self.count_wanted = False
        self.operators: int | None = None

    def count_next_step(self) -> None:
        """Count the operators the next step dispatches (forward, backward and update) into
        :attr:`operators`: the size of the graph a compile would build. That step runs slower
        (each operator passes through Python), so it should not be one whose time is measured."""
        self.count_wanted = True

    def why_not_in_background(self, state: TrainState) -> str | None:
        """Why a child process may not build the compiled step for this run
        (:func:`~pyro_elbo.train.background.why_not_fork`); ``None``: it may."""
        compiled = self.compiled
        if not isinstance(compiled, _Compiled):
            return "the step has no compiled graph"
        return background.why_not_fork(state.params, compiled.compiled.backend, state.context.active)

    def compile_in_background(self, import_first: bool = False) -> None:
        """Build the compiled step in a child process (:mod:`~pyro_elbo.train.background`) forked
        right before the next (eager) step (check :meth:`why_not_in_background` first).
        ``import_first``: import inductor here before the fork (seconds), for a run that will
        switch and so import it anyway: the child inherits it and compiles that much sooner."""
        self.background_wanted, self.import_first = True, import_first

    def stop_background(self) -> None:
        """Kill and reap the child, if one runs."""
        self.background_wanted = False
        if self.background is not None:
            self.background.stop()

    @property
    def active(self) -> Stepper:
        return self.compiled if self.use_compiled else self.eager

    @property
    def deferred(self) -> bool:
        return self.active.deferred

    @property
    def replayable(self) -> bool:
        return self.active.replayable

    def switch(self, state: TrainState, compiled: bool) -> None:
        """Use the compiled (``True``) or the eager stepper from the next step on."""
        if self.use_compiled and not compiled:
            self.compiled.release(state)
        self.use_compiled = compiled

    def __call__(self, state: TrainState, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Outcome:
        if self.background_wanted:
            self.background_wanted = False
            compiled = self.compiled
            if self.import_first and isinstance(compiled, _Compiled) and compiled.compiled.backend == "inductor":
                start = time.perf_counter()
                prepare_compile_fx()
                self.import_seconds = time.perf_counter() - start
            self.background = BackgroundCompile.start(lambda: self._build(state, args, kwargs))
        if self.count_wanted:
            self.count_wanted = False
            with counting_operators() as counted:
                outcome = self.active(state, args, kwargs)
            self.operators = counted.count
            return outcome
        return self.active(state, args, kwargs)

    def _build(self, state: TrainState, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """In the child: one compiled step on the child's copy of the state; whether the graph
        was built."""
        self.compiled(state, args, kwargs)
        compiled = self.compiled
        return isinstance(compiled, _Compiled) and compiled.compiled.failed is None

    def compile_seconds(self) -> float | None:
        return self.compiled.compile_seconds()

    def settle(self, state: TrainState, rng_of_last: dict[str, Any] | None = None) -> None:
        self.active.settle(state, rng_of_last)

    def release(self, state: TrainState) -> None:
        self.active.release(state)


def stepper_for(compiled: CompiledLoss | None) -> Stepper:
    """The stepper for what :func:`~pyro_elbo.train.init` built: eager without a compiled loss,
    the flat Adam step when the update runs in the graph, else compiled gradients."""
    if compiled is None:
        return EagerStep()
    if compiled.adam:
        return FlatAdamStep(compiled)
    return CompiledGradients(compiled)


def apply_update(state: TrainState, loss: Tensor, finite: Tensor | None) -> tuple[float, bool]:
    """With gradients in ``.grad``: average them over processes (``torch.distributed``), then, if
    the loss and every gradient are finite, clip and take the optimizer's step; else clear them.
    ``finite``: the graph's verdict (``None``: computed here)."""
    params, opt = state.params, state.optimizer
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
