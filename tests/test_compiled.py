"""The compiled whole-step path: equal to eager on the same draws, fresh randomness, trains module
parameters, recompiles on new shapes, falls back with one warning, and keeps fit's features."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule, pyro_method

import pyro_elbo
from pyro_elbo.compile.graph import CompiledLoss
from pyro_elbo.objectives import OBJECTIVES, make_objective

from models import default_conjugate, relative_tolerance


def test_fit_compile_is_available() -> None:
    c = default_conjugate()
    result = pyro_elbo.fit(
        c.model, c.guide_at(0.0, 1.0), 2, num_steps=3, compile=True, compile_backend="eager", progress=False
    )
    assert result.compile_seconds is not None and len(result.history) == 3


def _params() -> dict[str, torch.Tensor]:
    store = pyro.get_param_store()
    return {name: store._params[name] for name in store.keys()}


@pytest.mark.parametrize("name", sorted(set(OBJECTIVES) - {"vimco"}))
def test_compiled_equals_eager_on_the_same_draws(name: str) -> None:
    c = default_conjugate()
    guide = c.guide_at(0.2, 0.8)
    objective = make_objective(name, num_particles=4)
    objective.loss(c.model, guide, 3)  # create the parameters
    params = _params()
    compiled = CompiledLoss(objective, c.model, guide, backend="eager")
    pyro.set_rng_seed(5)
    loss, finite, grads = compiled(params, (3,), {})
    pyro.set_rng_seed(5)
    eager = objective.differentiable_loss(c.model, guide, 3)
    eager_grads = torch.autograd.grad(eager, list(params.values()), allow_unused=True)
    assert bool(finite)
    assert float(loss) == pytest.approx(float(eager.detach()), rel=1e-12, abs=1e-12)
    for g, e in zip(grads, eager_grads):
        expected = torch.zeros_like(g) if e is None else e
        assert torch.allclose(g, expected, rtol=1e-10, atol=1e-12)


def test_vimco_and_score_function_sites_compile() -> None:
    probs = torch.tensor([0.3, 0.7])

    def model():
        k = pyro.sample("k", dist.Categorical(probs))
        pyro.sample("x", dist.Normal(torch.tensor([0.0, 2.0])[k], 1.0), obs=torch.tensor(1.5))

    def guide():
        pyro.sample("k", dist.Categorical(logits=pyro.param("logits", torch.zeros(2))))

    objective = pyro_elbo.VIMCO(num_particles=4)
    objective.loss(model, guide)
    compiled = CompiledLoss(objective, model, guide, backend="eager")
    pyro.set_rng_seed(1)
    loss, _, grads = compiled(_params(), (), {})
    pyro.set_rng_seed(1)
    eager = objective.differentiable_loss(model, guide)
    assert float(loss) == pytest.approx(float(eager.detach()), rel=1e-12)
    assert torch.allclose(grads[0], torch.autograd.grad(eager, [_params()["logits"]])[0])


def test_compiled_step_draws_fresh_randomness_and_recompiles_on_new_shapes() -> None:
    c = default_conjugate()
    guide = c.guide_at(0.2, 0.8)
    objective = pyro_elbo.ELBO(num_particles=2)
    objective.loss(c.model, guide, 3)
    compiled = CompiledLoss(objective, c.model, guide, backend="eager")
    first = float(compiled(_params(), (3,), {})[0])
    second = float(compiled(_params(), (3,), {})[0])
    assert first != second
    assert len(compiled.graphs) == 1
    data = torch.linspace(0, 1, 4)

    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def g(x):
        pyro.sample("z", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

    objective.loss(model, g, data)
    compiled = CompiledLoss(objective, model, g, backend="eager")
    compiled({"m": pyro.get_param_store()._params["m"]}, (data,), {})
    compiled({"m": pyro.get_param_store()._params["m"]}, (torch.linspace(0, 1, 7),), {})
    assert len(compiled.graphs) == 2


def test_module_parameters_train_when_compiled() -> None:
    """pyro.module networks: their weights are graph inputs, not constants baked in."""
    encoder = torch.nn.Linear(1, 2)
    decoder = torch.nn.Linear(1, 1)
    x = torch.linspace(-1, 1, 8)

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(decoder(z.unsqueeze(-1)).squeeze(-1), 0.5), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        out = encoder(x.unsqueeze(-1))
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(out[..., 0], out[..., 1].exp()))

    objective = pyro_elbo.DReG(num_particles=3)
    objective.loss(model, guide, x)
    params = _params()
    compiled = CompiledLoss(objective, model, guide, backend="eager")
    pyro.set_rng_seed(2)
    _, _, grads = compiled(params, (x,), {})
    pyro.set_rng_seed(2)
    eager = torch.autograd.grad(objective.differentiable_loss(model, guide, x), list(params.values()))
    assert set(params) == {"encoder$$$weight", "encoder$$$bias", "decoder$$$weight", "decoder$$$bias"}
    for g, e in zip(grads, eager):
        assert torch.allclose(g, e, rtol=1e-10, atol=1e-12) and float(g.abs().sum()) > 0
    before = encoder.weight.detach().clone()
    pyro_elbo.fit(
        model, guide, x, objective=objective, num_steps=5, compile=True, compile_backend="eager", progress=False
    )
    assert not torch.equal(before, encoder.weight.detach())
    assert isinstance(encoder.weight, torch.nn.Parameter)


def test_uncapturable_model_falls_back_with_one_warning() -> None:
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        if float(z) > 0:  # a data-dependent Python branch cannot be captured
            pyro.factor("bonus", torch.tensor(0.1))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.5))

    def guide():
        pyro.sample("z", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pyro_elbo.fit(model, guide, num_steps=20, compile=True, compile_backend="eager", progress=False)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "falling back to the eager path" in messages[0]
    assert len(result.history) == 20 and all(math.isfinite(v) for v in result.history)


def test_in_graph_adam_matches_torch_adam_and_resume_is_exact(tmp_path: Path) -> None:
    c = default_conjugate()

    def run(**options: Any) -> pyro_elbo.FitResult:
        pyro.clear_param_store()
        return pyro_elbo.fit(
            c.model, c.guide_at(0.0, 1.0), 2, objective=pyro_elbo.IWAE(num_particles=4), num_steps=30, seed=3,
            compile_backend="eager", progress=False, optimizer_options={"foreach": False}, **options,
        )  # fmt: skip

    runs = {compile_: run(compile=compile_) for compile_ in (False, True)}
    for name in runs[False].params:
        assert torch.allclose(runs[True].params[name], runs[False].params[name], rtol=relative_tolerance(), atol=1e-12)
    assert runs[True].history == pytest.approx(runs[False].history, rel=relative_tolerance())
    # checkpoint + resume on the compiled path: identical to the straight compiled run
    path = tmp_path / "c.pt"
    run(compile=True, checkpoint=path, checkpoint_every=5, callbacks=[lambda step, loss: step < 17])
    resumed = run(compile=True, checkpoint=path, resume=True, checkpoint_every=5)
    assert resumed.resumed_from_step == 17  # the stopped run saved its last step
    assert resumed.history == runs[True].history
    for name in resumed.params:
        assert torch.equal(resumed.params[name], runs[True].params[name])


def test_inductor_compiles_and_trains() -> None:
    """The real backend (a few seconds of compilation): same objective trajectory as eager."""
    c = default_conjugate()
    result = pyro_elbo.fit(
        c.model,
        c.guide_at(0.0, 1.0),
        2,
        objective=pyro_elbo.STL(),
        num_steps=300,
        lr=0.05,
        seed=0,
        compile=True,
        progress=False,
    )
    assert result.compile_seconds is not None
    assert torch.allclose(result.params["loc"], torch.full((2,), c.post_loc), atol=0.02)
    assert torch.allclose(result.params["scale"], torch.full((2,), c.post_scale), atol=0.02)


def test_compiled_objective_in_pyro_svi() -> None:
    """Objective(compile=True) under pyro.infer.SVI: the first step runs eagerly, the rest as one
    graph; parameters still train to the posterior."""
    c = default_conjugate()
    guide = c.guide_at(0.0, 1.0)
    objective = pyro_elbo.STL(compile=True)
    svi = pyro.infer.SVI(c.model, guide, pyro.optim.Adam({"lr": 0.05}), loss=objective)
    for _ in range(400):
        svi.step(2)
    ((compiled, names),) = objective._svi_steps.programs.values()
    assert set(names) == {"loc", "scale"} and len(compiled.graphs) == 1
    store = pyro.get_param_store()
    assert torch.allclose(store["loc"].detach(), torch.full((2,), c.post_loc), atol=0.02)
    assert torch.allclose(store["scale"].detach(), torch.full((2,), c.post_scale), atol=0.02)


class _Shift(PyroModule):
    """A plain nn.Parameter read in a @pyro_method model, outside any forward."""

    def __init__(self) -> None:
        super().__init__()
        self.prior_loc = torch.nn.Parameter(torch.tensor(0.3))

    @pyro_method
    def model(self, x):
        z = pyro.sample("z", dist.Normal(self.prior_loc, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    @pyro_method
    def guide(self, x):
        pyro.sample("z", dist.Normal(pyro.param("q_loc", torch.tensor(0.0)), 1.0))


def test_parameters_read_in_a_pyro_method_are_graph_inputs() -> None:
    """Compiled and eager gradients agree for every parameter the eager step updates (before, the
    module's parameter was baked in as a constant: gradient exactly 0, parameter frozen)."""
    module, x = _Shift(), torch.tensor([1.0, 2.0, 0.5])
    objective = pyro_elbo.ELBO(num_particles=3)
    objective.loss(module.model, module.guide, x)
    params = _params()
    assert set(params) == {"prior_loc", "q_loc"}
    compiled = CompiledLoss(objective, module.model, module.guide, backend="eager")
    pyro.set_rng_seed(6)
    _, _, grads = compiled(params, (x,), {})
    pyro.set_rng_seed(6)
    eager = torch.autograd.grad(objective.differentiable_loss(module.model, module.guide, x), list(params.values()))
    for name, g, e in zip(params, grads, eager):
        assert float(e.abs()) > 0 and torch.allclose(g, e, rtol=1e-10, atol=1e-12), name
    assert isinstance(module.prior_loc, torch.nn.Parameter)  # the slot was put back
    before = module.prior_loc.detach().clone()
    pyro_elbo.fit(module.model, module.guide, x, num_steps=3, compile=True, compile_backend="eager", progress=False)
    assert not torch.equal(before, module.prior_loc.detach())


def test_a_parameter_the_capture_cannot_replace_falls_back_naming_it() -> None:
    net = torch.nn.Linear(1, 1)
    # reached through a dict, not as a module the program names (those get slots in the capture)
    nets = {"net": net}

    def model():
        pyro.module("net", nets["net"])
        pyro.sample("z", dist.Normal(nets["net"].bias.squeeze(), 1.0))  # read outside the module's forward

    def guide():
        pyro.sample("z", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

    before = net.bias.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pyro_elbo.fit(model, guide, num_steps=3, compile=True, compile_backend="eager", progress=False)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "'net$$$bias'" in messages[0] and "falling back" in messages[0]
    assert not torch.equal(before, net.bias.detach())  # the eager fallback trains it


def test_compiled_step_on_the_test_device_draws_fresh_and_owns_its_state(device: torch.device) -> None:
    """With ``--device cuda`` the inductor graph runs as CUDA graphs: every replay must draw new
    randomness, and the optimizer state must live in buffers the step owns (views of the flat
    moment buffers, updated in place as ``torch.optim.Adam`` does), never in a graph output that a
    later replay overwrites."""
    from pyro_elbo.train import init, step

    c = default_conjugate()
    state = init(c.model, c.guide_at(0.0, 1.0), 2, objective=pyro_elbo.ELBO(), compile=True, device=device)
    losses = []
    for _ in range(4):
        state, info = step(state)
        losses.append(info.loss)
    assert state.compiled is not None and state.compiled.adam and state.compile_seconds is not None
    assert len(set(losses)) == 4  # one particle from a continuous guide: equal losses mean repeated draws
    assert state.flat is not None
    first = next(iter(state.params.values()))
    held = state.optimizer.state[first]["exp_avg"]
    assert held.untyped_storage().data_ptr() == state.flat.exp_avg.untyped_storage().data_ptr()
    assert first.untyped_storage().data_ptr() == state.flat.flat.untyped_storage().data_ptr()
    snapshot = held.clone()
    step(state)
    assert state.optimizer.state[first]["exp_avg"] is held  # written in place, as eager Adam does
    assert not torch.equal(held, snapshot)


def test_data_of_another_memory_layout_gets_its_own_graph() -> None:
    """Inductor's graphs are compiled for their inputs' strides (and do not check them on CPU:
    ``size_asserts`` off); the same data given column-major instead of row-major must get a graph
    of its own, not be read with the row-major strides. A model without latent variables, so that
    the loss is deterministic: it must equal the row-major loss up to float32 rounding."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 7, generator=gen)
    y = torch.bernoulli(torch.full((300,), 0.5), generator=gen)

    def model(x: torch.Tensor, y: torch.Tensor) -> None:
        w = pyro.param("w", torch.linspace(-1.0, 1.0, 7))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Bernoulli(logits=(x * w).sum(-1)), obs=y)

    def guide(x: torch.Tensor, y: torch.Tensor) -> None:
        pass

    pyro.clear_param_store()
    model(x, y)
    params = {"w": pyro.param("w").unconstrained()}
    compiled = CompiledLoss(pyro_elbo.ELBO(), model, guide)
    column_major = x.t().contiguous().t()
    assert torch.equal(column_major, x) and column_major.stride() != x.stride()
    losses = []
    for data in (x, column_major):
        out = compiled(params, (data, y), {})
        assert out is not None
        losses.append(float(out[0]))
    assert len(compiled.graphs) == 2
    # |loss| ~ 300 * 0.7: float32 rounding of 300 summed terms stays far below 1e-3 relative
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
