"""fit(compile="auto") compiles in a child process while training goes on eagerly: the switch
keeps the state bit-identical to an eager run of the same steps, a failing child falls back to
the foreground compile with one warning, and the child never outlives the run.

The eager step timings are substituted (as in ``test_autocompile``) so that the gate always
decides to compile; every run is bounded by a step cap and a wall-clock cap, so none can hang
whatever the child does."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
import warnings
from typing import Any

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_elbo
from pyro_elbo.train import autocompile, background, init, step
from pyro_elbo.train.hooks import Hook
from pyro_elbo.train.state import TrainState
from pyro_elbo.train.step import StepInfo
from pyro_elbo.train.steppers import AutoStep

from models import normal_mean_guide as guide
from models import normal_mean_model as model

#: no run in this file may take longer than this (seconds of wall clock)
WALL_CAP = 300.0


def always_compile(monkeypatch: pytest.MonkeyPatch, idle: float = 2.0) -> None:
    """Eager steps 'take' one second and compiled ones 0.1 s, so the plan always compiles and the
    compiled step is kept (no run is long enough to compile in the foreground at once: the
    runs here ask for many steps and stop themselves); the CPU meter reads ``idle`` idle cores at
    once (two free cores by default: the child is forked)."""
    monkeypatch.setattr(autocompile, "LONG_RUN", math.inf)

    def seconds(self: autocompile.AutoCompile, info: StepInfo) -> float:
        return {"compiling": 3.0, "timing": 0.1}.get(self.phase, 1.0)

    def read(self: background.CpuMeter) -> background.IdleCores:
        return background.IdleCores(idle, 2.0, self.elapsed(), "substituted")

    monkeypatch.setattr(autocompile.AutoCompile, "seconds", seconds)
    monkeypatch.setattr(background.CpuMeter, "read", read)
    monkeypatch.setattr(background, "CPU_WINDOW_SECONDS", 0.0)


def child_never_finishes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The child's build (a fast capture on the 'eager' backend) never returns: the run must end or
    raise with the child still compiling."""
    monkeypatch.setattr(background, "CACHED_BACKENDS", ("eager",))

    def forever(self: AutoStep, *args: Any) -> bool:
        while True:
            time.sleep(1.0)

    monkeypatch.setattr(AutoStep, "_build", forever)


class Watch(Hook):
    """Records the child and a copy of the state at the switch, and stops the run ``after`` steps
    past it (or at the wall-clock cap)."""

    def __init__(self, after: int = 4) -> None:
        self.after = after
        self.pid: int | None = None
        self.switch_step: int | None = None
        self.at_switch: dict[str, Any] = {}
        self.start = time.perf_counter()

    def on_step(self, state: TrainState, info: StepInfo) -> str | None:
        stepper = state.stepper
        assert isinstance(stepper, AutoStep)
        if stepper.background is not None and self.pid is None:
            self.pid = stepper.background.pid
        if stepper.use_compiled and self.switch_step is None:
            self.switch_step = state.step
            self.at_switch = snapshot(state)
        if self.switch_step is not None and state.step >= self.switch_step + self.after:
            return "switched"
        if time.perf_counter() - self.start > WALL_CAP:
            return "wall-clock cap"
        return None


def snapshot(state: TrainState) -> dict[str, Any]:
    """Parameters and Adam state, copied."""
    params = {name: p.detach().clone() for name, p in state.params.items()}
    adam = {
        name: {key: value.clone() for key, value in state.optimizer.state[p].items()}
        for name, p in state.params.items()
    }
    return {"params": params, "adam": adam}


def fit(num_steps: int, hooks: list[Hook], backend: str = "inductor") -> pyro_elbo.FitResult:
    pyro.clear_param_store()
    x = torch.arange(6.0)
    return pyro_elbo.fit(
        model, guide, x, num_steps=num_steps, seed=0, compile="auto", compile_backend=backend,
        progress=False, hooks=hooks,
    )  # fmt: skip


def test_switch_keeps_the_state_of_an_eager_run(monkeypatch: pytest.MonkeyPatch) -> None:
    always_compile(monkeypatch)
    watch = Watch()
    result = fit(10**7, [watch])
    assert watch.pid is not None and watch.switch_step is not None, result.compile_decision
    assert watch.switch_step > 6  # the probe (5 steps) and at least one eager step beside the child
    assert result.compile_decision is not None and result.compile_decision.startswith("compile='auto' compiled")
    assert "after inductor's import before the fork" in result.compile_decision  # a long run imports first
    assert result.compile_seconds is not None
    with pytest.raises(ChildProcessError):  # exited and reaped
        os.waitpid(watch.pid, os.WNOHANG)

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    state = init(model, guide, torch.arange(6.0))
    for _ in range(watch.switch_step):
        state, _ = step(state, torch.arange(6.0))
    eager = snapshot(state)
    for name, value in eager["params"].items():
        assert torch.equal(value, watch.at_switch["params"][name]), name
    for name, moments in eager["adam"].items():
        for key, value in moments.items():
            assert torch.equal(value, watch.at_switch["adam"][name][key]), (name, key)


def test_failing_child_warns_once_and_compiles_in_the_foreground(monkeypatch: pytest.MonkeyPatch) -> None:
    always_compile(monkeypatch)
    monkeypatch.setattr(background, "CACHED_BACKENDS", ("eager",))  # a fast capture, same mechanism

    def fail(self: AutoStep, *args: Any) -> bool:
        raise RuntimeError("no graph")

    monkeypatch.setattr(AutoStep, "_build", fail)
    watch = Watch()
    with pytest.warns(RuntimeWarning, match="background compile failed .the compiled step raised in the child"):
        result = fit(10**7, [watch], backend="eager")
    assert watch.pid is not None and watch.switch_step is not None
    assert (result.compile_decision or "").startswith("compile='auto' compiled")


def test_child_is_killed_when_the_run_ends_first(monkeypatch: pytest.MonkeyPatch) -> None:
    always_compile(monkeypatch)
    child_never_finishes(monkeypatch)
    watch = Watch()
    result = fit(12, [watch], backend="eager")
    assert watch.pid is not None and watch.switch_step is None and len(result.history) == 12
    assert (result.compile_decision or "").startswith("compile='auto' stayed eager: the run ended before the switch")
    with pytest.raises(ChildProcessError):  # killed and reaped
        os.waitpid(watch.pid, os.WNOHANG)


def test_child_is_killed_when_a_step_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    always_compile(monkeypatch)
    child_never_finishes(monkeypatch)

    class Interrupt(Watch):
        def on_step(self, state: TrainState, info: StepInfo) -> str | None:
            super().on_step(state, info)
            if self.pid is not None:
                raise KeyboardInterrupt
            return None

    watch = Interrupt()
    with pytest.raises(KeyboardInterrupt):
        fit(100, [watch], backend="eager")
    assert watch.pid is not None
    with pytest.raises(ChildProcessError):
        os.waitpid(watch.pid, os.WNOHANG)


def test_a_capture_that_fails_in_the_child_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    always_compile(monkeypatch)
    monkeypatch.setattr(background, "CACHED_BACKENDS", ("eager",))

    def branching(x: torch.Tensor) -> None:
        z = pyro.sample("loc", dist.Normal(0.0, 1.0))
        if float(z) > 0:  # a data-dependent Python branch cannot be captured
            pyro.factor("bonus", torch.tensor(0.1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    class Stop(Watch):
        def on_step(self, state: TrainState, info: StepInfo) -> str | None:
            super().on_step(state, info)
            child = getattr(state.stepper, "background", None)
            done = child is not None and child.poll() is not None
            return "child done" if done and state.step >= (self.switch_step or 0) + 4 else None

    pyro.clear_param_store()
    watch = Stop()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pyro_elbo.fit(
            branching, guide, torch.arange(6.0), num_steps=10**7, compile="auto", compile_backend="eager",
            progress=False, hooks=[watch],
        )  # fmt: skip
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert watch.pid is not None
    assert len(messages) == 1 and "falling back to the eager path" in messages[0], messages
    assert (result.compile_decision or "").startswith("compile='auto' stayed eager: the capture failed")


def test_without_a_free_core_the_compile_runs_in_the_foreground(monkeypatch: pytest.MonkeyPatch) -> None:
    always_compile(monkeypatch, idle=0.1)
    monkeypatch.setattr(background, "CACHED_BACKENDS", ("eager",))
    watch = Watch()
    result = fit(10**7, [watch], backend="eager")
    assert watch.pid is None and watch.switch_step == 5  # right after the probe's 5 eager steps
    decision = result.compile_decision or ""
    assert decision.startswith("compile='auto' compiled")
    assert "; compiled in the foreground (too few cores were free: 0.10 of 2 cores idle over " in decision


def test_a_child_done_with_little_left_leaves_the_run_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan forks (16 'seconds' of eager steps left); when the child is done one step is
    left, whose second costs less than loading the compiled step: the run stays eager."""
    always_compile(monkeypatch)
    monkeypatch.setattr(background, "CACHED_BACKENDS", ("eager",))
    total = 20

    class WaitForChild(Watch):
        def on_step(self, state: TrainState, info: StepInfo) -> str | None:
            super().on_step(state, info)
            child = getattr(state.stepper, "background", None)
            while state.step == total - 2 and child is not None and child.poll() is None:
                assert time.perf_counter() - self.start < WALL_CAP
                time.sleep(0.05)
            return None

    watch = WaitForChild()
    result = fit(total, [watch], backend="eager")
    assert watch.pid is not None and watch.switch_step is None and len(result.history) == total
    decision = result.compile_decision or ""
    assert decision.startswith("compile='auto' stayed eager: a child process compiled for"), decision
    assert "the 1 steps left × 1000.00 ms = 1.00 s eager cost less than loading the compiled step" in decision
    with pytest.raises(ChildProcessError):
        os.waitpid(watch.pid, os.WNOHANG)


@pytest.mark.parametrize("ending", ["model raises", "SIGTERM"])
def test_no_child_survives_a_run_that_stops_early(monkeypatch: pytest.MonkeyPatch, ending: str) -> None:
    always_compile(monkeypatch)
    child_never_finishes(monkeypatch)
    broken = {"now": False}

    def breaking_guide(x: torch.Tensor) -> None:
        if broken["now"]:
            raise ValueError("the guide broke")
        guide(x)

    class Break(Watch):
        def on_step(self, state: TrainState, info: StepInfo) -> str | None:
            super().on_step(state, info)
            if self.pid is not None and not broken["now"]:
                broken["now"] = True
                if ending == "SIGTERM":
                    os.kill(os.getpid(), signal.SIGTERM)  # fit stops after this step
            return None

    watch = Break()
    pyro.clear_param_store()
    expected: type[BaseException] = ValueError if ending == "model raises" else SystemExit
    with pytest.raises(expected):
        pyro_elbo.fit(
            model, breaking_guide if ending == "model raises" else guide, torch.arange(6.0), num_steps=10**7,
            compile="auto", compile_backend="eager", progress=False, hooks=[watch],
        )  # fmt: skip
    assert watch.pid is not None
    with pytest.raises(ChildProcessError):  # killed and reaped
        os.waitpid(watch.pid, os.WNOHANG)


PARENT = """
import os, sys, time
from pyro_elbo.train.background import BackgroundCompile

def forever():
    while True:
        time.sleep(1.0)

child = BackgroundCompile.start(forever)
print(child.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_child_dies_with_a_killed_parent() -> None:
    """A parent killed by SIGKILL runs none of its exit paths: Linux kills the child."""
    with subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True) as parent:
        try:
            assert parent.stdout is not None
            pid = int(parent.stdout.readline())
            time.sleep(0.5)  # the child has asked for its parent's death signal
            assert alive(pid)
        finally:
            parent.kill()
            parent.wait(timeout=60)
    deadline = time.perf_counter() + 30.0
    while alive(pid) and time.perf_counter() < deadline:
        time.sleep(0.1)
    survived = alive(pid)
    if survived:
        os.kill(pid, signal.SIGKILL)  # leave nothing behind
    assert not survived


def alive(pid: int) -> bool:
    """The process runs (a zombie waiting for its reaper does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_cpu_meter_reads_idle_cores_of_this_process() -> None:
    meter = background.CpuMeter()
    time.sleep(0.3)
    idle = meter.read()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert 0.0 <= idle.idle <= max(0.0, idle.cores - 1.0) and 0 < idle.cores <= (cores or 1)
    assert idle.seconds >= 0.3
    if sys.platform.startswith("linux"):
        assert idle.source == "/proc/stat"
    assert str(idle).endswith(f"of {idle.cores:g} cores idle over {idle.seconds:.2f} s")
