"""``fit(compile="auto")``: compile the step only when it pays off within the requested steps,
and never make the run wait for a compile it could have run beside.

The decision is made on measurements of this run and machine, in four phases driven by
:class:`AutoCompile` (a hook that runs before the others):

1. **Eager probe.** The first ``probe + 2`` steps run eagerly (they are real training steps); the
   first is dropped (lazy set-up), the second counts the operators the step dispatches (forward,
   backward and update: :func:`~pyro_elbo.compile.torch_internals.counting_operators`), which is
   dropped too (counting slows it), and the median of the rest, :math:`t_e`, is the eager cost.
   Meanwhile :class:`~pyro_elbo.train.background.CpuMeter` measures how much CPU stands idle
   beside the training process (the probe goes on, eagerly, until it has measured
   :data:`~pyro_elbo.train.background.CPU_WINDOW_SECONDS`).
2. **Plan** (:func:`plan`). With :math:`R` steps left, eager training costs :math:`E = R\\,t_e`.

   - :math:`E` below :data:`MIN_COMPILE_SECONDS` (the cheapest compile we measured: capture and
     inductor with a warm cache): the run stays eager.
   - :math:`E` at least :data:`LONG_RUN` times the expected compile, :math:`\\hat C`
     (:func:`expected_compile_seconds`: a cold compile on one core grows with the operators the
     step dispatches, as its graph does; divided by the share of a core the eager steps got: on
     a machine busy with other work the compile takes longer, as the steps do): compile in the
     foreground now (phase 4). A long run ends soonest
     this way: a compile beside the eager steps takes longer than in their place, and the switch
     then loads the compiled step from the caches again, while the eager steps it buys are few.
   - Otherwise, when two cores stood idle (at least
     :data:`~pyro_elbo.train.background.SPARE_CORES`) and a child process may compile for this
     run: compile in the background (phase 3); the run is never later than an eager run by more
     than the compile from the caches at the switch (seconds). One idle core is not enough: on a
     two-core machine the eager steps beside a compile were measured ~30% slower (the VAE, the
     enumerated HMM), which costs more than the compile saves in this middle range.
   - Otherwise (no cores to spare, or no child possible: another backend than inductor,
     parameters off the CPU, ``torch.distributed``): compile in the foreground when :math:`E` is
     at least :math:`\\hat C`, else stay eager.
3. **Compile in the background.** A child process builds the compiled step
   (:mod:`pyro_elbo.train.background`, forked right before the next eager step) while training
   goes on eagerly (when :math:`E` is at least twice the expected compile the run
   will switch, and import inductor then anyway: it imports it before the fork, so the child
   starts compiling at once); the hook polls the child between steps. When it has exited cleanly the
   compiler's caches hold the graph; if the eager time left is still at least
   :data:`MIN_COMPILE_SECONDS` (what loading the compiled step from the caches costs), the run
   goes to phase 4, else it stays eager. If the child fails, the compile happens in the foreground
   with one warning (a failed capture's own, which names the line). A run that ends first stays
   eager, and the child is killed when the run ends for any reason.
4. **Compile and check.** The next step captures and compiles (from the caches when the child
   filled them; its time :math:`C` is measured), ``probe`` compiled steps give :math:`t_c`, and
   the run keeps the compiled step if :math:`t_c < t_e`, else returns to eager. The decision line
   says whether the compile paid off within the requested steps, i.e. whether
   :math:`C + R' t_c < R' t_e + C_{\\text{probe}}` (:math:`R'` the steps left after the compile),
   and the break-even step count :math:`C / (t_e - t_c)`.

The line (with the idle cores measured and, for a background compile, how long the child ran
beside how many eager steps) is written by the progress bar and kept in
``FitResult.compile_decision``.

Draws: every step before the switch is an eager step of the parent process and draws from the
global random state exactly as ``compile=False`` would (the child's draws are its own copy's); the
first compiled step draws from the same state the next eager step would have started from, and
from then on the compiled step's own draws (the random numbers of one generator, consumed in
another order). Parameters and Adam state at the switch are bit-identical to an eager run's of
the same steps. The step of the switch depends on how long the compile took, so two runs with the
same seed agree up to the earlier switch only; ``compile=False`` or ``compile=True`` give
runs that repeat exactly.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings

from pyro_elbo.train import background
from pyro_elbo.train.background import NOT_BUILT, CpuMeter, IdleCores
from pyro_elbo.train.hooks import Hook
from pyro_elbo.train.state import TrainState
from pyro_elbo.train.step import StepInfo
from pyro_elbo.train.steppers import AutoStep, EagerStep

#: a lower bound on capture + compilation (seconds, warm caches): below this much eager time, never compile
MIN_COMPILE_SECONDS = 2.0

#: what a compile is expected to cost (seconds: a small model's cold compile, on one core) when
#: the step's operators could not be counted
EXPECTED_COMPILE_SECONDS = 10.0

#: a cold compile on one core, :math:`a + b\\,n` seconds for a step that dispatches :math:`n`
#: operators: :data:`COMPILE_SECONDS_AT_NO_OPERATORS` is :math:`a` (capture, imports, the C++
#: compiler's start-up), :data:`COMPILE_SECONDS_PER_OPERATOR` is :math:`b` (fitted to the models of
#: ``tests/pyro_models.py`` and five of Pyro's examples by ``benchmarks/compile_cost.py``, least
#: squares; see ``benchmarks/README.md``)
COMPILE_SECONDS_AT_NO_OPERATORS = 6.1
COMPILE_SECONDS_PER_OPERATOR = 0.0115


def expected_compile_seconds(operators: int | None) -> float:
    """Seconds of one core that capturing and compiling a step of ``operators`` operators (forward,
    backward and update, as dispatched by one eager step) is expected to take with an empty cache;
    :data:`EXPECTED_COMPILE_SECONDS` when they were not counted (``None``)."""
    if operators is None:
        return EXPECTED_COMPILE_SECONDS
    return COMPILE_SECONDS_AT_NO_OPERATORS + COMPILE_SECONDS_PER_OPERATOR * operators


#: eager time left of at least this many expected compiles: compile in the foreground at once
LONG_RUN = 2.0

#: eager steps left out of the timing: the first (lazy set-up) and the one whose operators are counted
PROBE_SKIPS = 2


def plan(
    remaining: int,
    eager_seconds: float,
    cpu: IdleCores,
    unavailable: str | None,
    min_compile_seconds: float = MIN_COMPILE_SECONDS,
    operators: int | None = None,
) -> tuple[str, str]:
    """Phase 2 of the module docstring: ``"eager"``, ``"background"`` or ``"foreground"``, and
    why. ``remaining`` eager steps of ``eager_seconds``; ``cpu``: the CPU idle beside the run and
    the share of a core the run got (a compile in the foreground is expected to take
    :func:`expected_compile_seconds` of the step's ``operators`` divided by ``cpu.share``);
    ``unavailable``: why no child process may compile (``None``: one may)."""
    total = remaining * eager_seconds
    left = f"{remaining} steps left × {1e3 * eager_seconds:.2f} ms = {total:.2f} s eager"
    if total < min_compile_seconds:
        return (
            "eager",
            f"compile='auto' stayed eager: {left}, less than a compile costs (≥ {min_compile_seconds:.0f} s)",
        )
    expected_seconds = expected_compile_seconds(operators)
    expected = expected_seconds / max(cpu.share, 0.05)
    size = "" if operators is None else f" for a step of {operators} operators"
    if total >= LONG_RUN * expected:
        return "foreground", (
            f"compiled in the foreground: {left}, at least {LONG_RUN:g}× the ~{expected:.0f} s a compile{size} is "
            "expected to cost, so it pays off at once (a compile beside the eager steps would end later)"
        )
    if unavailable is None and cpu.idle >= background.SPARE_CORES:
        return "background", f"two cores were free: {cpu}"
    why = f"no child process: {unavailable}" if unavailable is not None else f"too few cores were free: {cpu}"
    if total < expected:
        cost = f"~{expected_seconds:.0f} s{size}"
        if cpu.share < 0.95:
            cost += f" at the {cpu.share:.2f} of a core this run got: {expected:.0f} s"
        return "eager", (
            f"compile='auto' stayed eager: {left}, less than a compile is expected to cost ({cost}), "
            f"and it could not run beside the training ({why})"
        )
    return "foreground", f"compiled in the foreground ({why})"


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
    """Runs the phases of the module docstring on ``state`` (put it first among the hooks):
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
        self.state: TrainState | None = None
        self.meter: CpuMeter | None = None
        self.note = ""  # how the compile ran, appended to the decision line
        self.warming_since, self.forked_at = 0.0, 0

    def on_start(self, state: TrainState) -> None:
        if state.compiled is None:
            self.phase = "done"
            return
        self.auto = AutoStep(EagerStep(), state.stepper)  # eager until decided
        state.stepper = self.auto
        self.state = state
        self.meter = CpuMeter()

    def seconds(self, info: StepInfo) -> float:
        """The step's wall-clock time (a separate method so tests can substitute timings)."""
        return info.seconds

    def on_step(self, state: TrainState, info: StepInfo) -> str | None:
        if self.phase == "eager":
            self.eager.append(self.seconds(info))
            if len(self.eager) == 1 and self.auto is not None:
                self.auto.count_next_step()
            if len(self.eager) > self.probe + 1:
                self._plan(state)
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

    def _plan(self, state: TrainState) -> None:
        """Phase 2: stay eager, fork the child, or compile now (once the CPU window is measured)."""
        if self.auto is None or self.meter is None:
            return
        eager, remaining = statistics.median(self.eager[PROBE_SKIPS:]), self.total - state.step
        unavailable = self.auto.why_not_in_background(state)
        worth = unavailable is None and remaining * eager >= MIN_COMPILE_SECONDS
        if worth and self.meter.elapsed() < background.CPU_WINDOW_SECONDS:
            return  # a child may pay: measure the idle CPU a little longer (the steps go on eagerly)
        operators = self.auto.operators
        action, why = plan(remaining, eager, self.meter.read(), unavailable, MIN_COMPILE_SECONDS, operators)
        if action == "eager":
            self.phase, state.compile_decision = "done", why
        elif action == "background":
            self.note = why
            self.auto.compile_in_background(import_first=remaining * eager >= 2 * expected_compile_seconds(operators))
            self.phase, self.warming_since, self.forked_at = "warming", time.perf_counter(), state.step
        else:
            self.note = why
            self._compile_now(state)

    def _poll_background(self, state: TrainState) -> None:
        """Between steps: once the child has exited, compile from the caches it filled and switch
        (warn once and compile in the foreground if it failed), unless the eager steps left cost
        less than that compile."""
        child = self.auto.background if self.auto is not None else None
        if child is None:  # the fork failed: compile in the foreground
            self.note += "; the fork failed"
            self._compile_now(state)
            return
        if child.poll() is None:
            return
        beside = (
            f"a child process compiled for {time.perf_counter() - self.warming_since:.1f} s beside "
            f"{state.step - self.forked_at} eager steps"
        )
        if self.auto is not None and self.auto.import_seconds is not None:
            beside += f", after inductor's import before the fork ({self.auto.import_seconds:.1f} s)"
        self.note = f"{beside} ({self.note})"
        if not child.built and child.status != NOT_BUILT:  # a failed capture warns itself, below
            warnings.warn(
                f"compile='auto': the background compile failed ({child.describe()}); compiling in the "
                "foreground instead",
                RuntimeWarning,
                stacklevel=2,
            )
        eager, remaining = statistics.median(self.eager[PROBE_SKIPS:]), self.total - state.step
        if child.status != NOT_BUILT and remaining * eager < MIN_COMPILE_SECONDS:
            self.phase = "done"
            state.compile_decision = (
                f"compile='auto' stayed eager: {beside}, and the {remaining} steps left × "
                f"{1e3 * eager:.2f} ms = {remaining * eager:.2f} s eager cost less than loading the compiled "
                f"step (≥ {MIN_COMPILE_SECONDS:.0f} s)"
            )
            return
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
        eager, compiled = statistics.median(self.eager[PROBE_SKIPS:]), statistics.median(self.compiled_times)
        remaining = self.total - state.step + len(self.compiled_times)
        keep, why = verdict(remaining, eager, compiled, self.compile_seconds)
        self.phase, state.compile_decision = "done", f"{why}; {self.note}" if self.note else why
        self._use(state, compiled=keep)

    def close(self) -> None:
        """The run ended (for any reason): kill the background compile if it still runs."""
        if self.auto is None:
            return
        if self.phase == "eager" and self.state is not None and self.state.compile_decision is None:
            self.phase = "done"
            self.state.compile_decision = (
                f"compile='auto' stayed eager: the run ended after {len(self.eager)} steps, within the "
                f"eager probe ({self.probe + PROBE_SKIPS} steps)"
            )
        if self.phase == "warming":
            self.phase = "done"
            seconds = time.perf_counter() - self.warming_since
            self.auto.stop_background()
            if self.state is not None:
                self.state.compile_decision = (
                    f"compile='auto' stayed eager: the run ended before the switch, {self.state.step - self.forked_at} "
                    f"steps ({seconds:.1f} s) after a child process began to compile ({self.note})"
                )
        self.auto.stop_background()
