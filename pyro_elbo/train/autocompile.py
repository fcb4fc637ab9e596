"""``fit(compile="auto")``: compile the step only when it pays off within the requested steps.

The decision is made on measurements of this run, in four phases driven by :class:`AutoCompile`
(a hook that runs before the others):

1. **Eager probe.** The first ``probe + 1`` steps run eagerly (they are real training steps); the
   first is dropped (lazy set-up) and the median of the rest, :math:`t_e`, is the eager cost.
2. **Gate.** With :math:`R` steps left, eager training costs :math:`R\\,t_e`. Compiling costs at
   least :data:`MIN_COMPILE_SECONDS` (capture + inductor, warm cache, on the machines we
   measured), so if :math:`R\\,t_e` is below it the run stays eager without compiling.
3. **Compile in the background.** Otherwise a child process builds the compiled step
   (:mod:`pyro_elbo.train.background`, forked right before the next eager step) while training
   goes on eagerly; the hook polls the child between steps. When it has exited cleanly the
   compiler's caches hold the graph. If the child fails, the compile happens in the foreground
   as below, with one warning (a failed capture's own, which names the line). Where forking
   does not pay or is not safe (another backend than inductor, parameters off the CPU,
   ``torch.distributed``) this phase is skipped. A run that ends first stays eager, and the
   child is killed when the run ends for any reason.
4. **Compile and check.** The next step captures and compiles (from the caches when the child
   filled them; its time :math:`C` is measured), ``probe`` compiled steps give :math:`t_c`, and
   the run keeps the compiled step if :math:`t_c < t_e`, else returns to eager. The decision line says whether the compile paid off
   within the requested steps, i.e. whether :math:`C + R' t_c < R' t_e + C_{\\text{probe}}`
   (:math:`R'` the steps left after the compile), and the break-even step count
   :math:`C / (t_e - t_c)`.

The line is written by the progress bar and kept in ``FitResult.compile_decision``.

Draws: every step before the switch is an eager step of the parent process and draws from the
global random state exactly as ``compile=False`` would (the child's draws are its own copy's); the
first compiled step draws from the same state the next eager step would have started from.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings

from pyro_elbo.train.background import NOT_BUILT
from pyro_elbo.train.hooks import Hook
from pyro_elbo.train.state import TrainState
from pyro_elbo.train.step import StepInfo
from pyro_elbo.train.steppers import AutoStep, EagerStep

#: a lower bound on capture + compilation (seconds): below this much eager time, never compile
MIN_COMPILE_SECONDS = 2.0


def gate(remaining: int, eager_seconds: float, min_compile_seconds: float = MIN_COMPILE_SECONDS) -> tuple[bool, str]:
    """Whether to try compiling, and why: ``remaining`` eager steps of ``eager_seconds`` cost
    less than the cheapest compile, or they do not."""
    total = remaining * eager_seconds
    if total < min_compile_seconds:
        return False, (
            f"compile='auto' stayed eager: {remaining} steps left × {1e3 * eager_seconds:.2f} ms = {total:.2f} s "
            f"eager, less than a compile costs (≥ {min_compile_seconds:.0f} s)"
        )
    return True, ""


def verdict(remaining: int, eager_seconds: float, compiled_seconds: float, compile_seconds: float) -> tuple[bool, str]:
    """After compiling: keep the compiled step if it is faster per step; say whether the compile
    (``compile_seconds``) paid off over the ``remaining`` steps and where it breaks even."""
    timings = (
        f"eager {1e3 * eager_seconds:.2f} ms/step, compiled {1e3 * compiled_seconds:.2f} ms/step, "
        f"compile {compile_seconds:.1f} s"
    )
    saving = eager_seconds - compiled_seconds
    if saving <= 0:
        return False, f"compile='auto' went back to eager: the compiled step is not faster ({timings})"
    break_even = math.ceil(compile_seconds / saving)
    paid = "paid off" if remaining * saving >= compile_seconds else "did not pay off"
    return True, (
        f"compile='auto' compiled: {timings}; breaks even after {break_even} steps, {remaining} were left "
        f"after the compile ({paid})"
    )


class AutoCompile(Hook):
    """Runs the four phases of the module docstring on ``state`` (put it first among the hooks):
    ``state.stepper`` becomes an :class:`~pyro_elbo.train.steppers.AutoStep` of the eager stepper
    and the one ``init`` chose, and the hook tells it which to use.

    Args:
        total: the run's total steps.
        probe: eager (and compiled) steps timed before each decision.
    """

    def __init__(self, total: int, probe: int = 3) -> None:
        self.total, self.probe = total, probe
        self.phase = "eager"
        self.eager: list[float] = []
        self.compiled_times: list[float] = []
        self.auto: AutoStep | None = None
        self.compile_seconds = 0.0
        self.settle_every = 1
        self.warming_since = 0.0
        self.state: TrainState | None = None
        self.background_note = ""

    def on_start(self, state: TrainState) -> None:
        if state.compiled is None:
            self.phase = "done"
            return
        self.auto = AutoStep(EagerStep(), state.stepper)  # eager until decided
        state.stepper = self.auto
        self.state = state

    def seconds(self, info: StepInfo) -> float:
        """The step's wall-clock time (a separate method so tests can substitute timings)."""
        return info.seconds

    def on_step(self, state: TrainState, info: StepInfo) -> str | None:
        if self.phase == "eager":
            self.eager.append(self.seconds(info))
            if len(self.eager) > self.probe:
                self._decide_to_try(state)
        elif self.phase == "warming":
            self._poll_background(state)
        elif self.phase == "compiling":
            if info.compile_seconds is None and state.compiled is not None and state.compiled.failed:
                self.phase = "done"  # capture failed: CompiledLoss warned and the step ran eagerly
                state.compile_decision = "compile='auto' stayed eager: the capture failed (see the warning)"
                self._use(state, compiled=False)
                return None
            self.compile_seconds = self.seconds(info)
            self.phase = "timing"
        elif self.phase == "timing":
            self.compiled_times.append(self.seconds(info))
            if len(self.compiled_times) >= self.probe:
                self._decide_to_keep(state)
        return None

    def _use(self, state: TrainState, compiled: bool) -> None:
        """Switch the stepper (between steps: the state is unchanged) and restore the settle
        interval the timing phase lowered."""
        if self.auto is not None:
            self.auto.switch(state, compiled)
        state.settle_every = self.settle_every

    def _decide_to_try(self, state: TrainState) -> None:
        eager = statistics.median(self.eager[1:])
        remaining = self.total - state.step
        go, why = gate(remaining, eager)
        if not go:
            self.phase, state.compile_decision = "done", why
            return
        if self.auto is None:
            return
        if self.auto.compile_in_background(state):
            self.phase, self.warming_since = "warming", time.perf_counter()
            return
        self._compile_now(state)

    def _poll_background(self, state: TrainState) -> None:
        """Between steps: switch to the compiled step once the child has exited (warn once and
        compile in the foreground if it failed)."""
        child = self.auto.background if self.auto is not None else None
        if child is None:  # the fork failed: compile in the foreground
            self._compile_now(state)
            return
        if child.poll() is None:
            return
        self.background_note = (
            f"; the child compiled for {time.perf_counter() - self.warming_since:.1f} s beside eager steps"
        )
        if not child.built and child.status != NOT_BUILT:  # a failed capture warns itself, below
            warnings.warn(
                f"compile='auto': the background compile failed ({child.describe()}); compiling in the "
                "foreground instead",
                RuntimeWarning,
                stacklevel=2,
            )
        self._compile_now(state)

    def _compile_now(self, state: TrainState) -> None:
        """The next step captures and compiles (reading the caches the child filled, if any)."""
        if self.auto is None:
            return
        self.phase = "compiling"
        self.auto.switch(state, True)
        # time the compiled steps as the eager ones were: each step waits for the device
        self.settle_every, state.settle_every = state.settle_every, 1

    def _decide_to_keep(self, state: TrainState) -> None:
        eager, compiled = statistics.median(self.eager[1:]), statistics.median(self.compiled_times)
        remaining = self.total - state.step + len(self.compiled_times)
        keep, why = verdict(remaining, eager, compiled, self.compile_seconds)
        self.phase, state.compile_decision = "done", why + self.background_note
        self._use(state, compiled=keep)

    def close(self) -> None:
        """The run ended (for any reason): kill the background compile if it still runs."""
        if self.auto is None:
            return
        if self.phase == "warming":
            self.phase = "done"
            seconds = time.perf_counter() - self.warming_since
            self.auto.stop_background()
            if self.state is not None:
                self.state.compile_decision = (
                    f"compile='auto' stayed eager: the run ended before the switch to the compiled step "
                    f"(the background compile ran {seconds:.1f} s)"
                )
        self.auto.stop_background()
