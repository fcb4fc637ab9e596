"""One contract over every implementation of a training step: eager, compiled gradients (the
optimizer steps eagerly), compiled Adam per parameter, and the flat compiled Adam step.

Run on the captured graph uncompiled (``compile_backend="eager"``: the eager path's draws), every
path must take the same steps; a non-finite step must leave parameters and optimizer state
bit-identical and raise (or skip) with the same message; and a state saved by ``state_dict`` and
loaded into a fresh state must continue as the original does.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import Any

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

import pyro_elbo
from pyro_elbo.compile import flat
from pyro_elbo.train import TrainState, init, step

from models import relative_tolerance

X = torch.tensor([0.5, 1.5, 1.0, -0.3, 0.8])
NAN = torch.tensor([0.5, float("nan"), 1.0, -0.3, 0.8])

#: the step implementations, and how ``init`` is asked for each
PATHS = ("eager", "compiled_gradients", "compiled_adam", "flat_adam")


def model(x: torch.Tensor) -> None:
    z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(z.sum(-1), 1.0), obs=x)


def guide(x: torch.Tensor) -> None:
    loc = pyro.param("loc", torch.zeros(2))
    scale = pyro.param("scale", torch.ones(2), constraint=constraints.positive)
    pyro.sample("z", dist.Normal(loc, scale).to_event(1))


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "compiled_adam":  # the per-parameter graph: what runs when the flat layout cannot
        monkeypatch.setattr(flat.FlatAdam, "bind", classmethod(lambda cls, *args, **kwargs: None))
    yield request.param


def _state(path: str, **options: Any) -> TrainState:
    """A fresh state whose steps run ``path``. Compiled gradients: any ``clip_norm`` keeps Adam out
    of the graph; one this large never clips (the gradients are scaled by exactly 1)."""
    pyro.clear_param_store()
    state = init(
        model, guide, X, objective=pyro_elbo.IWAE(num_particles=3), lr=0.05, seed=1,
        compile=path != "eager", compile_backend="eager", optimizer_options={"foreach": False},
        clip_norm=1e30 if path == "compiled_gradients" else None, **options,
    )  # fmt: skip
    return state


def _check_path(state: TrainState, path: str) -> None:
    """The step that ran is the one the test is about."""
    compiled = state.compiled
    if path == "eager":
        assert compiled is None
        return
    assert compiled is not None and compiled.failed is None and compiled.graphs
    assert compiled.adam == (path != "compiled_gradients")
    assert (state.flat is not None) == (path == "flat_adam")


def _snapshot(state: TrainState) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    state.settle()
    params = {name: p.detach().clone() for name, p in state.params.items()}
    adam = [
        {key: value.detach().clone() for key, value in state.optimizer.state[p].items()} for p in state.params.values()
    ]
    return params, adam


def _assert_identical(a: Any, b: Any) -> None:
    (params_a, adam_a), (params_b, adam_b) = a, b
    assert params_a.keys() == params_b.keys()
    assert all(torch.equal(params_a[name], params_b[name]) for name in params_a)
    assert len(adam_a) == len(adam_b)
    for one, other in zip(adam_a, adam_b):
        assert one.keys() == other.keys() and all(torch.equal(one[k], other[k]) for k in one)


def _eager_reference(num_steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    state = _state("eager")
    losses = [step(state)[1].loss for _ in range(num_steps)]
    return losses, {name: p.detach().clone() for name, p in state.params.items()}


def test_every_path_takes_the_eager_steps_on_the_same_draws(path: str) -> None:
    losses, params = _eager_reference(8)
    state = _state(path)
    got = [step(state)[1].loss for _ in range(8)]
    _check_path(state, path)
    assert got == pytest.approx(losses, rel=relative_tolerance())
    for name, value in params.items():
        assert torch.allclose(state.params[name], value, rtol=relative_tolerance(), atol=1e-7), name


def _nonfinite_message(path: str) -> str:
    with pyro.validation_enabled(False):  # a NaN observation is then a non-finite loss, not a ValueError
        return _refused(path)


def _refused(path: str) -> str:
    state = _state(path)
    for _ in range(3):
        step(state)
    before = _snapshot(state)
    with pytest.raises(pyro_elbo.NonFiniteLossError) as raised:
        step(state, NAN)
        state.settle()  # the flat step reads its ledger here at the latest
    _assert_identical(_snapshot(state), before)
    assert state.step == 3  # the record is as it was before the refused step
    return str(raised.value)


def test_a_nonfinite_step_changes_nothing_and_raises_the_same_message(path: str) -> None:
    message = _nonfinite_message(path)
    assert "'x'" in message, message  # the site whose log-density is not finite
    assert message == _nonfinite_message("eager")


@pyro.validation_enabled(False)
def test_a_skipped_step_changes_nothing_and_is_counted(path: str) -> None:
    state = _state(path, on_nonfinite="skip")
    for _ in range(3):
        step(state)
    before = _snapshot(state)
    step(state, NAN)
    state.settle()
    _assert_identical(_snapshot(state), before)
    assert state.num_skipped == 1 and state.step == 4
    assert math.isfinite(step(state)[1].loss)  # and training goes on


def test_a_state_dict_round_trip_continues_the_run(path: str) -> None:
    original = _state(path)
    for _ in range(4):
        step(original)
    saved = copy.deepcopy(original.state_dict())  # as written to disk: no tensor shared with the run
    after = [step(original)[1].loss for _ in range(4)]
    resumed = _state(path)
    resumed.load_state_dict(saved)
    assert resumed.step == 4
    assert [step(resumed)[1].loss for _ in range(4)] == after
    _assert_identical(_snapshot(resumed), _snapshot(original))
    _check_path(resumed, path)
