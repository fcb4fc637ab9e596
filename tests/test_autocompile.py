"""fit(compile="auto"): the decision from timed eager steps and the timed compile, with the
step timings substituted (deterministic), and the two pure rules it applies."""

from __future__ import annotations

import math
import threading

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_elbo
import pyro_elbo.compiled
from pyro_elbo.train import TrainState, autocompile, init, step
from pyro_elbo.train.step import StepInfo


def model(x: torch.Tensor) -> None:
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(loc, 1.0), obs=x)


def guide(x: torch.Tensor) -> None:
    m = pyro.param("m", torch.tensor(0.0))
    s = pyro.param("s", torch.tensor(1.0), constraint=dist.constraints.positive)
    pyro.sample("loc", dist.Normal(m, s))


def fake_timings(monkeypatch: pytest.MonkeyPatch, eager: float, compiled: float, compile: float) -> None:
    """Step seconds as if eager steps took ``eager``, the compile step ``compile`` and compiled
    steps ``compiled`` (the phase tells which one the hook is timing)."""

    def seconds(self: autocompile.AutoCompile, info: StepInfo) -> float:
        return {"eager": eager, "compiling": compile, "timing": compiled}.get(self.phase, eager)

    monkeypatch.setattr(autocompile.AutoCompile, "seconds", seconds)


def run(steps: int) -> pyro_elbo.FitResult:
    x = torch.randn(8)
    return pyro_elbo.fit(model, guide, x, num_steps=steps, compile="auto", compile_backend="eager", progress=False)


def test_five_steps_stay_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_timings(monkeypatch, eager=0.01, compiled=0.001, compile=10.0)
    result = run(5)
    assert result.compile_seconds is None  # never captured
    assert result.compile_decision is not None and result.compile_decision.startswith("compile='auto' stayed eager")
    assert "1 steps left" in result.compile_decision and len(result.history) == 5


def test_long_run_compiles_and_keeps_the_faster_step(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_timings(monkeypatch, eager=1.0, compiled=0.1, compile=3.0)
    result = run(12)
    assert result.compile_seconds is not None  # the capture ran
    decision = result.compile_decision or ""
    assert decision.startswith("compile='auto' compiled") and "breaks even after 4 steps" in decision
    assert "(paid off)" in decision and len(result.history) == 12


def test_slower_compiled_step_goes_back_to_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_timings(monkeypatch, eager=1.0, compiled=2.0, compile=3.0)
    result = run(12)
    assert (result.compile_decision or "").startswith("compile='auto' went back to eager")


def test_rules() -> None:
    assert autocompile.gate(100, 0.01, 2.0)[0] is False  # 1 s of eager work < the cheapest compile
    assert autocompile.gate(1000, 0.01, 2.0)[0] is True
    keep, why = autocompile.verdict(100, 0.01, 0.002, 5.0)  # saves 0.8 s over 100 steps < 5 s
    assert keep and "breaks even after 625 steps" in why and "did not pay off" in why
    assert autocompile.verdict(100, 0.01, 0.02, 5.0)[0] is False


def test_bad_compile_value() -> None:
    with pytest.raises(ValueError, match="compile must be"):
        pyro_elbo.fit(model, guide, torch.randn(3), num_steps=1, compile="yes", progress=False)


class SlowCompile:
    """Stands in for inductor in the background thread: waits until released, then returns the
    graph uncompiled (a real compile takes tens of seconds; what is tested is the switch)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def __call__(
        self, graph: torch.fx.GraphModule, inputs: list[torch.Tensor], backend: str, **options: object
    ) -> object:
        self.calls += 1
        assert threading.current_thread() is not threading.main_thread()  # (the test's own check)
        self.release.wait(timeout=120)
        return real_compile_graph(graph, inputs, "eager")


real_compile_graph = pyro_elbo.compiled.compile_graph


def _snapshot(state: TrainState) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in state.params.values()]
    for p in state.params.values():
        tensors += [v.detach().clone() for _, v in sorted(state.optimizer.state[p].items())]
    return tensors


def test_a_background_compile_switches_between_steps_with_the_state_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    """While the graph compiles in the background the steps are eager steps, bit-identical to an
    eager run's (parameters, Adam state and losses); the first step after the compile finished
    runs the graph, from the state the eager steps left."""
    slow = SlowCompile()
    monkeypatch.setattr(pyro_elbo.compiled, "compile_graph", slow)
    x = torch.randn(8)

    def fresh(compile_: bool) -> TrainState:
        pyro.clear_param_store()
        return init(model, guide, x, seed=2, compile=compile_, optimizer_options={"foreach": False})

    eager = fresh(False)
    eager_losses = [step(eager)[1].loss for _ in range(6)]
    background = fresh(True)
    assert background.compiled is not None
    background.compiled.background = True
    losses = [step(background)[1].loss for _ in range(6)]  # the first traces and starts the compile
    assert slow.calls == 1 and not background.compiled.graphs  # still compiling: every step was eager
    assert losses == eager_losses
    at_switch = _snapshot(background)
    assert all(torch.equal(a, b) for a, b in zip(at_switch, _snapshot(eager)))
    slow.release.set()
    background.compiled.pending[next(iter(background.compiled.pending))].thread.join(timeout=120)
    info = step(background)[1]
    assert background.compiled.graphs and info.compile_seconds is not None  # this step ran the graph
    assert math.isfinite(info.loss) and background.flat is not None
    background.settle()
    assert not all(torch.equal(a, b) for a, b in zip(at_switch, _snapshot(background)))  # and it trained


def test_auto_keeps_training_while_it_compiles(monkeypatch: pytest.MonkeyPatch) -> None:
    slow = SlowCompile()
    monkeypatch.setattr(pyro_elbo.compiled, "compile_graph", slow)
    timings = {"eager": 1.0, "compiling": 1.0, "timing": 0.1}
    monkeypatch.setattr(autocompile.AutoCompile, "seconds", lambda self, info: timings.get(self.phase, 1.0))
    steps_while_compiling = []

    def release_after_five(step_number: int, loss: float) -> bool:
        hook_phase = "compiling" if slow.calls and not slow.release.is_set() else ""
        if hook_phase:
            steps_while_compiling.append(step_number)
            if len(steps_while_compiling) == 5:
                slow.release.set()
        return True

    x = torch.randn(8)
    result = pyro_elbo.fit(
        model, guide, x, num_steps=40, compile="auto", progress=False, callbacks=[release_after_five]
    )
    decision = result.compile_decision or ""
    assert len(steps_while_compiling) == 5 and len(result.history) == 40
    assert decision.startswith("compile='auto' compiled") and "in the background beside eager steps" in decision
    assert "1.0 s lost" in decision, decision  # the tracing step only: the eager steps beside it cost no extra
