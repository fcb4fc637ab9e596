"""Hooks: what :func:`~pyro_elbo.train.fit` does around each step, one object per concern.

After every step ``fit`` calls ``hook.on_step(state, info)`` for each hook in order; a hook that
returns a string stops the run with that ``stop_reason`` (TFP's ``convergence_criterion``), and a
hook can record what it likes (TFP's ``trace_fn``). ``on_start`` runs before the first step,
``on_end`` after the last one of a run that was not interrupted by an error, ``close`` always.
``fit``'s keyword arguments build these; pass your own with ``fit(..., hooks=[...])``::

    class StopBelow(Hook):
        def __init__(self, threshold: float) -> None:
            self.threshold = threshold

        def on_step(self, state: TrainState, info: StepInfo) -> str | None:
            return "below_threshold" if info.loss < self.threshold else None
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from pyro_elbo._random import forked_rng
from pyro_elbo.compile import CompileProgress
from pyro_elbo.train import checkpoint
from pyro_elbo.train.data import as_args, to_device
from pyro_elbo.train.state import TrainState
from pyro_elbo.train.step import StepInfo

Callback = Callable[[int, float], Any]


class Hook:
    """Does nothing; subclasses override what they need."""

    def on_start(self, state: TrainState) -> None:
        """Before the first step (after a resume)."""

    def on_step(self, state: TrainState, info: StepInfo) -> str | None:
        """After each step; a string stops the run with that reason."""
        return None

    def on_end(self, state: TrainState) -> None:
        """After the last step of a run that ended without an error."""

    def on_interrupt(self, state: TrainState) -> None:
        """After the last step of a run stopped by SIGTERM or SIGINT (instead of ``on_end``)."""

    def close(self) -> None:
        """Always, last (release resources)."""


class Progress(Hook):
    """A tqdm bar with the running loss, steps/s and ETA (only on the main process).

    The bar is redrawn at most every ``interval`` seconds, and only then is the loss read (on the
    compiled path it is a device tensor until read): between redraws a step costs a counter
    increment and a clock read.
    """

    def __init__(self, total: int, interval: float = 0.25) -> None:
        self.total, self.interval = total, interval
        self.bar: Any = None
        self.decision: str | None = None
        self.pending = 0
        self.last = 0.0
        self.compiling: CompileProgress | None = None

    def on_start(self, state: TrainState) -> None:
        if state.context.is_main:
            from tqdm.auto import tqdm  # type: ignore[import-untyped]

            self.bar = tqdm(
                total=self.total, initial=state.step, desc="fit", unit="step", dynamic_ncols=True, mininterval=0.25
            )
            if state.resumed_from_step is not None:
                self.bar.write(f"resumed from step {state.resumed_from_step}")
            self.last = time.monotonic()
            self.compiling = CompileProgress(show=self._show_compile)  # tracing, inductor: one line
            self.compiling.start()

    def _show_compile(self, text: str, final: bool) -> None:
        """A compile's phases in the bar's description while it runs; its summary as a line."""
        if final:
            self.bar.set_description_str("fit", refresh=False)
            if text:
                self.bar.write(text)
        else:
            self.bar.set_description_str(text)

    def on_step(self, state: TrainState, info: StepInfo) -> str | None:
        if self.bar is None:
            return None
        if self.compiling is not None and self.compiling.phases:  # a capture ran: its summary, or
            self.compiling.finish(write=info.compile_seconds is not None)  # none if it fell back
        elif info.compile_seconds is not None:
            self.bar.write(f"compiled the step in {info.compile_seconds:.1f} s")
        if state.compile_decision is not None and state.compile_decision != self.decision:
            self.decision = state.compile_decision
            self.bar.write(self.decision)
        self.pending += 1
        now = time.monotonic()
        if now - self.last >= self.interval or state.step == self.total:
            self.last = now
            self.bar.set_postfix(loss=f"{info.loss:.4g}", refresh=False)
            self.bar.update(self.pending)
            self.pending = 0
        return None

    def close(self) -> None:
        if self.compiling is not None:
            self.compiling.stop(write=False)
        if self.bar is not None:
            if self.pending:
                self.bar.update(self.pending)
            self.bar.close()


class Validation(Hook):
    """The loss on held-out ``data`` (args as a tuple, or a ``DataLoader``) every ``every`` steps,
    appended to ``state.validation_history`` (drawn from a forked random stream)."""

    def __init__(self, data: Any, every: int = 100) -> None:
        if every < 1:
            raise ValueError("validate_every must be >= 1")
        self.data, self.every = data, every

    def on_step(self, state: TrainState, info: StepInfo) -> str | None:
        if state.step % self.every == 0:
            state.validation_history.append((state.step, self.loss(state)))
        return None

    def loss(self, state: TrainState) -> float:
        batches = self.data if isinstance(self.data, torch.utils.data.DataLoader) else [self.data]
        total = 0.0
        with forked_rng():
            for batch in batches:
                args = to_device(as_args(batch), state.device)
                total += state.objective.loss(state.model, state.guide, *args, **state.kwargs)
        return total


class Checkpointer(Hook):
    """Write the state to ``path`` atomically every ``every`` steps and at the end (the main
    process writes; every process takes part in gathering the random states). The location is
    checked for writability before the first step."""

    def __init__(self, path: str | os.PathLike[str], every: int = 100) -> None:
        if every < 1:
            raise ValueError("checkpoint_every must be >= 1")
        self.path, self.every = Path(path), every

    def on_start(self, state: TrainState) -> None:
        if state.context.is_main:
            checkpoint.check_writable(self.path)

    def on_step(self, state: TrainState, info: StepInfo) -> str | None:
        if state.step % self.every == 0:
            self.write(state)
        return None

    def on_end(self, state: TrainState) -> None:
        if state.step % self.every != 0:
            self.write(state)

    def on_interrupt(self, state: TrainState) -> None:
        self.on_end(state)

    def write(self, state: TrainState) -> None:
        snapshot = state.state_dict()
        if state.context.is_main:
            checkpoint.save_checkpoint(self.path, snapshot)


class Callbacks(Hook):
    """Functions ``(step, loss)`` called after every step; one returning ``False`` stops the run
    (``stop_reason="callback"``; all are called first)."""

    def __init__(self, callbacks: Sequence[Callback]) -> None:
        self.callbacks = list(callbacks)

    def on_step(self, state: TrainState, info: StepInfo) -> str | None:
        stop = [cb(state.step, info.loss) for cb in self.callbacks]
        return "callback" if any(s is False for s in stop) else None


class EarlyStopping(Hook):
    """Stop (``"early_stopping"``) when the running mean of the loss (over ``max(10, patience //
    10)`` finite steps) has not improved by ``min_delta`` for ``patience`` steps."""

    def __init__(self, patience: int, min_delta: float = 0.0) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience, self.min_delta = patience, min_delta
        self.window = max(10, patience // 10)
        self.recent: list[float] = []
        self.best = math.inf
        self.since_best = 0

    def on_step(self, state: TrainState, info: StepInfo) -> str | None:
        if not info.finite:
            return None
        self.recent.append(info.loss)
        if len(self.recent) > self.window:
            self.recent.pop(0)
        mean = sum(self.recent) / len(self.recent)
        if mean < self.best - self.min_delta:
            self.best, self.since_best = mean, 0
        else:
            self.since_best += 1
        return "early_stopping" if self.since_best >= self.patience else None
