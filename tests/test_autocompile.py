"""fit(compile="auto"): the decision from timed eager steps and the timed compile, with the
step timings substituted (deterministic), and the two pure rules it applies."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_elbo
from pyro_elbo.train import autocompile
from pyro_elbo.train.background import CpuMeter, IdleCores
from pyro_elbo.train.hooks import Hook
from pyro_elbo.train.state import TrainState
from pyro_elbo.train.step import StepInfo

from models import normal_mean_guide as guide
from models import normal_mean_model as model


def fake_timings(monkeypatch: pytest.MonkeyPatch, eager: float, compiled: float, compile: float) -> None:
    """Step seconds as if eager steps took ``eager``, the compile step ``compile`` and compiled
    steps ``compiled`` (the phase tells which one the hook is timing); the run 'got' a whole core
    and no other core was idle."""

    def seconds(self: autocompile.AutoCompile, info: StepInfo) -> float:
        return {"eager": eager, "compiling": compile, "timing": compiled}.get(self.phase, eager)

    def read(self: CpuMeter) -> IdleCores:
        return IdleCores(0.0, 2.0, self.elapsed(), "substituted", share=1.0)

    monkeypatch.setattr(autocompile.AutoCompile, "seconds", seconds)
    monkeypatch.setattr(CpuMeter, "read", read)


def run(steps: int) -> pyro_elbo.FitResult:
    x = torch.randn(8)
    return pyro_elbo.fit(model, guide, x, num_steps=steps, compile="auto", compile_backend="eager", progress=False)


def test_five_steps_stay_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_timings(monkeypatch, eager=0.01, compiled=0.001, compile=10.0)
    result = run(6)
    assert result.compile_seconds is None  # never captured
    assert result.compile_decision is not None and result.compile_decision.startswith("compile='auto' stayed eager")
    assert "1 steps left" in result.compile_decision and len(result.history) == 6


def test_a_run_shorter_than_the_probe_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_timings(monkeypatch, eager=0.01, compiled=0.001, compile=10.0)
    result = run(3)
    assert (
        result.compile_decision
        == "compile='auto' stayed eager: the run ended after 3 steps, within the eager probe (5 steps)"
    )


def test_long_run_compiles_and_keeps_the_faster_step(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_timings(monkeypatch, eager=2.0, compiled=0.1, compile=3.0)  # 7 steps left: 14 s eager
    monkeypatch.setattr(autocompile, "expected_compile_seconds", lambda operators: 10.0)  # 14 s < 2 × 10 s
    result = run(12)
    assert result.compile_seconds is not None  # the capture ran
    decision = result.compile_decision or ""
    assert decision.startswith("compile='auto' compiled") and "breaks even after 2 steps" in decision
    assert "compiled in the foreground (no child process: the 'eager' backend" in decision
    assert "(paid off)" in decision and len(result.history) == 12


def test_slower_compiled_step_goes_back_to_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_timings(monkeypatch, eager=2.0, compiled=3.0, compile=3.0)
    result = run(12)
    assert (result.compile_decision or "").startswith("compile='auto' went back to eager")


def wide_model(x: torch.Tensor) -> None:
    """The test model with three more latent sites: a larger step, and so a larger graph."""
    model(x)
    for k in range(3):
        pyro.sample(f"extra{k}", dist.Normal(0.0, 1.0))


def wide_guide(x: torch.Tensor) -> None:
    guide(x)
    for k in range(3):
        m = pyro.param(f"m{k}", torch.tensor(0.0))
        s = pyro.param(f"s{k}", torch.tensor(1.0), constraint=dist.constraints.positive)
        pyro.sample(f"extra{k}", dist.Normal(m, s))


class Operators(Hook):
    """Reads the operator count the auto stepper took during the probe."""

    count: int | None = None

    def on_end(self, state: TrainState) -> None:
        self.count = getattr(state.stepper, "operators", None)


def test_the_probe_counts_the_steps_operators_without_changing_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """One probe step runs under the operator counter: the run stays bit-identical to an eager
    run of the same seed, and a step with more sites counts more operators."""
    fake_timings(monkeypatch, eager=0.01, compiled=0.001, compile=10.0)  # stays eager after the probe
    x = torch.randn(8)
    counts, histories = [], []
    for m, g, compile in ((model, guide, "auto"), (model, guide, False), (wide_model, wide_guide, "auto")):
        pyro.clear_param_store()
        hook = Operators()
        result = pyro_elbo.fit(
            m, g, x, num_steps=8, seed=1, compile=compile, compile_backend="eager", progress=False, hooks=[hook]
        )
        counts.append(hook.count)
        histories.append(result.history)
    assert histories[0] == histories[1]  # the counted step changed nothing
    small, wide = counts[0], counts[2]
    assert small is not None and wide is not None and 20 < small < wide, counts
    assert autocompile.expected_compile_seconds(wide) > autocompile.expected_compile_seconds(small)


def test_rules() -> None:
    free, busy = IdleCores(2.0, 4.0, 0.3, "/proc/stat"), IdleCores(0.2, 2.0, 0.3, "/proc/stat")
    one_free = IdleCores(1.0, 2.0, 0.3, "/proc/stat")
    loaded = IdleCores(0.0, 2.0, 0.3, "/proc/stat", share=0.4)
    # operators not counted: a compile is expected to cost 10 s of a core
    assert autocompile.plan(100, 0.01, free, None, 2.0)[0] == "eager"  # 1 s of eager work < any compile
    assert autocompile.plan(1000, 0.01, free, None, 2.0)[0] == "background"
    action, why = autocompile.plan(2000, 0.01, free, None, 2.0)  # 20 s: twice the compile, at once
    assert action == "foreground" and "at least 2× the ~10 s a compile is expected to cost" in why
    action, why = autocompile.plan(999, 0.01, one_free, None, 2.0)  # one idle core is not enough
    assert action == "eager" and "too few cores were free: 1.00 of 2 cores idle" in why
    action, why = autocompile.plan(1000, 0.01, busy, None, 2.0)  # 10 s: no core to run 10 s beside
    assert action == "foreground" and "too few cores were free: 0.20 of 2 cores idle over 0.30 s" in why
    action, why = autocompile.plan(999, 0.01, busy, None, 2.0)
    assert action == "eager" and "less than a compile is expected to cost (~10 s)" in why
    action, why = autocompile.plan(2000, 0.01, loaded, None, 2.0)  # 20 s < 10 s / 0.4 of a core
    assert action == "eager" and "(~10 s at the 0.40 of a core this run got: 25 s)" in why
    assert autocompile.plan(2500, 0.01, loaded, None, 2.0)[0] == "foreground"
    assert autocompile.plan(4000, 0.01, free, None, 2.0)[0] == "foreground"  # 40 s ≥ 2 × 10 s
    action, why = autocompile.plan(1000, 0.01, free, "the 'eager' backend keeps no on-disk cache", 2.0)
    assert action == "foreground" and "no child process: the 'eager' backend" in why
    # 1000 operators counted: 6.1 s + 1000 × 11.5 ms = 17.6 s expected
    action, why = autocompile.plan(2000, 0.01, busy, None, 2.0, 1000)  # 20 s: more than one compile, less than two
    assert action == "foreground" and "too few cores were free" in why
    action, why = autocompile.plan(1500, 0.01, busy, None, 2.0, 1000)  # 15 s < 17.6 s
    assert action == "eager" and "less than a compile is expected to cost (~18 s for a step of 1000 operators)" in why
    action, why = autocompile.plan(3600, 0.01, free, None, 2.0, 1000)  # 36 s ≥ 2 × 17.6 s
    assert action == "foreground" and "the ~18 s a compile for a step of 1000 operators is expected" in why
    keep, why = autocompile.verdict(100, 0.01, 0.002, 5.0)  # saves 0.8 s over 100 steps < 5 s
    assert keep and "breaks even after 625 steps" in why and "did not pay off" in why
    assert autocompile.verdict(100, 0.01, 0.02, 5.0)[0] is False


def test_bad_compile_value() -> None:
    with pytest.raises(ValueError, match="compile must be"):
        pyro_elbo.fit(model, guide, torch.randn(3), num_steps=1, compile="yes", progress=False)
