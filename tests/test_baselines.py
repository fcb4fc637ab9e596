"""Pyro's baseline options (``infer={"baseline": {...}}``) as ``TraceGraph_ELBO`` reads them:
the same surrogate loss on the same draws, so equal gradients for the guide and the baseline."""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import Tensor, nn

import pyro_elbo

N, STEPS = 5, 2


class _AIRLike:
    """Two steps of AIR's structure in a data plate: a presence bit per step (Bernoulli, scored by
    the score function, each step's baseline a different option) and a reparameterized location."""

    def __init__(self, options: tuple[str, str]) -> None:
        torch.manual_seed(0)
        self.encoder = nn.Linear(2, 2)
        self.baseline_net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        self.options = options
        self.data = torch.linspace(-1.0, 1.5, N * 2).reshape(N, 2)

    def model(self, x):
        with pyro.plate("data", N):
            present = torch.ones(N)
            total = torch.zeros(N)
            for t in range(STEPS):
                present = pyro.sample(f"z_pres_{t}", dist.Bernoulli(0.6 * present))
                where = pyro.sample(f"z_where_{t}", dist.Normal(0.0, 1.0).mask(present.bool()))
                total = total + where  # depends on the presence bits only through the guide's draws
            pyro.sample("x", dist.Normal(total.unsqueeze(-1), 0.5).expand([N, 2]).to_event(1), obs=x)

    def baseline(self, t: int, x, present):
        kind = self.options[t]
        if kind == "nn":
            net_input = torch.cat([x, present.unsqueeze(-1)], -1)
            return {"nn_baseline": lambda v: self.baseline_net(v).squeeze(-1), "nn_baseline_input": net_input}
        if kind == "decaying":
            return {"use_decaying_avg_baseline": True, "baseline_beta": 0.8}
        if kind == "value":
            return {"baseline_value": pyro.param("bl_value", lambda: torch.full((N,), -1.0))}
        if kind == "nn+decaying":
            net_input = torch.cat([x, present.unsqueeze(-1)], -1)
            return {
                "nn_baseline": lambda v: self.baseline_net(v).squeeze(-1),
                "nn_baseline_input": net_input,
                "use_decaying_avg_baseline": True,
            }
        raise AssertionError(kind)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        pyro.module("baseline_net", self.baseline_net)
        with pyro.plate("data", N):
            present = torch.ones(N)
            for t in range(STEPS):
                logits = self.encoder(x)[:, 0] + 0.5 * t
                present = pyro.sample(
                    f"z_pres_{t}",
                    dist.Bernoulli(logits=logits).mask(present.bool()),
                    infer={"baseline": self.baseline(t, x, present)},
                )
                loc = self.encoder(x)[:, 1] * present
                pyro.sample(f"z_where_{t}", dist.Normal(loc, 0.7).mask(present.bool()))


def _step_grads(objective, program: _AIRLike, seed: int) -> tuple[float, dict[str, torch.Tensor]]:
    pyro.set_rng_seed(seed)
    program.guide(program.data)  # create the parameters
    params = {
        name: pyro.param(name).unconstrained() for name in pyro.get_param_store().keys() if "__baseline" not in name
    }
    for p in params.values():
        p.grad = None
    pyro.set_rng_seed(seed)
    loss = objective.loss_and_grads(program.model, program.guide, program.data)
    return loss, {name: p.grad.clone() for name, p in params.items() if p.grad is not None}


@pytest.mark.parametrize("options", [("nn", "decaying"), ("value", "nn+decaying")])
def test_baseline_options_give_trace_graph_elbo_gradients_on_the_same_draws(options) -> None:
    """Three successive steps (so the decaying averages have moved): the loss and every
    parameter's gradient, the baseline network's and ``baseline_value``'s included, equal
    ``TraceGraph_ELBO``'s up to float rounding."""
    program = _AIRLike(options)
    ours, theirs = pyro_elbo.ELBO(), pyro.infer.TraceGraph_ELBO()
    for seed in range(3):
        loss_ours, grads_ours = _step_grads(ours, program, seed)
        loss_theirs, grads_theirs = _step_grads(theirs, program, seed)
        assert loss_ours == pytest.approx(loss_theirs, rel=1e-6)
        assert grads_ours.keys() == grads_theirs.keys()
        baseline_params = [n for n in grads_ours if "baseline_net" in n or n == "bl_value"]
        assert baseline_params, "the baseline must receive a gradient"
        for name, grad in grads_theirs.items():
            assert torch.allclose(grads_ours[name], grad, rtol=1e-5, atol=1e-7), name


def test_baseline_of_the_wrong_shape_is_named() -> None:
    def model():
        with pyro.plate("data", 3):
            pyro.sample("z", dist.Bernoulli(0.5))

    def guide():
        with pyro.plate("data", 3):
            pyro.sample("z", dist.Bernoulli(0.4), infer={"baseline": {"baseline_value": torch.zeros(2)}})

    with pytest.raises(ValueError, match="'z'.*baseline"):
        pyro_elbo.ELBO().differentiable_loss(model, guide)


def test_unknown_baseline_option_is_refused_by_name() -> None:
    def model():
        pyro.sample("z", dist.Bernoulli(0.5))

    def guide():
        pyro.sample("z", dist.Bernoulli(0.4), infer={"baseline": {"use_avg": True}})

    with pytest.raises(ValueError, match="use_avg"):
        pyro_elbo.ELBO().differentiable_loss(model, guide)


def test_unknown_infer_key_is_warned_about_once_by_name() -> None:
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        pyro.sample("z", dist.Normal(0.1, 1.0), infer={"my_option": 3})

    with pytest.warns(UserWarning, match="my_option"):
        pyro_elbo.ELBO().loss(model, guide)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pyro_elbo.ELBO().loss(model, guide)


def _discrete_pair():
    probs = torch.tensor([0.3, 0.7])

    def model():
        k = pyro.sample("k", dist.Categorical(probs))
        pyro.sample("x", dist.Normal(2.0 * k, 1.0), obs=torch.tensor(1.5))

    def guide():
        pyro.sample("k", dist.Categorical(logits=pyro.param("logits", lambda: torch.zeros(2))))

    return model, guide


def test_running_baseline_is_captured_in_the_compiled_graph() -> None:
    """ELBO(num_particles=1) with a discrete site: the captured step reads and advances the running
    baseline as the eager step does, call after call (same draws, same losses and gradients)."""
    from pyro_elbo.compile.graph import CompiledLoss

    model, guide = _discrete_pair()
    eager, captured = pyro_elbo.ELBO(), pyro_elbo.ELBO()
    for objective in (eager, captured):
        pyro.set_rng_seed(0)
        objective.loss_and_grads(model, guide)  # the first step runs eagerly and creates the state
    compiled = CompiledLoss(captured, model, guide, backend="eager")
    logits = pyro.get_param_store()._params["logits"]
    for seed in range(1, 4):
        pyro.set_rng_seed(seed)
        loss, _, grads = compiled({"logits": logits}, (), {})
        pyro.set_rng_seed(seed)
        expected = eager.differentiable_loss(model, guide)
        assert float(loss) == pytest.approx(float(expected.detach()), rel=1e-12)
        assert torch.allclose(grads[0], torch.autograd.grad(expected, [logits])[0])
        assert torch.allclose(captured.state_dict()["baseline"]["k"], eager.state_dict()["baseline"]["k"])


def test_discrete_guide_compiles_under_svi_without_falling_back() -> None:
    """With compile=True, SVI's steps run the compiled graph (no fallback warning: warnings are
    errors here) and the baseline keeps moving."""
    model, guide = _discrete_pair()
    objective = pyro_elbo.ELBO(compile=True)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), loss=objective)
    states = []
    for _ in range(4):
        svi.step()
        states.append(float(objective.state_dict()["baseline"]["k"]))
    assert len(set(states[1:])) == 3, states


def test_baseline_options_are_captured_in_the_compiled_graph() -> None:
    """The captured step (dependencies from the eager run, the decaying average updated in place)
    gives the eager step's loss and gradients, call after call, on the same draws."""
    from pyro_elbo.compile.graph import CompiledLoss

    program = _AIRLike(("nn", "decaying"))
    eager, captured = pyro_elbo.ELBO(), pyro_elbo.ELBO()
    for objective in (eager, captured):
        pyro.set_rng_seed(0)
        objective.loss_and_grads(program.model, program.guide, program.data)
    store = pyro.get_param_store()
    params = {name: store._params[name] for name in store.keys()}
    compiled = CompiledLoss(captured, program.model, program.guide, backend="eager")
    for seed in range(1, 4):
        pyro.set_rng_seed(seed)
        loss, _, grads = compiled(params, (program.data,), {})
        pyro.set_rng_seed(seed)
        expected = eager.differentiable_loss(program.model, program.guide, program.data)
        assert float(loss) == pytest.approx(float(expected.detach()), rel=1e-10)
        expected_grads = torch.autograd.grad(expected, list(params.values()), allow_unused=True)
        for grad, want in zip(grads, expected_grads):
            assert torch.allclose(grad, torch.zeros_like(grad) if want is None else want, rtol=1e-8, atol=1e-10)
        assert torch.allclose(captured.state_dict()["baseline"]["z_pres_1"], eager.state_dict()["baseline"]["z_pres_1"])


def test_infer_keys_pyro_sets_itself_are_not_warned_about() -> None:
    """poutine.reparam marks its auxiliary sites with infer={"is_observed": ...}: bookkeeping, no warning."""
    from pyro.infer.reparam import LocScaleReparam

    @pyro.poutine.reparam(config={"z": LocScaleReparam(0.5)})
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 2.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(1.0))

    guide = pyro.infer.autoguide.AutoNormal(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pyro_elbo.ELBO().loss(model, guide)


def test_fit_compiled_from_the_first_step_carries_the_running_baseline() -> None:
    """fit(compile=True) traces its very first step, before the running baseline exists: the
    baseline made by the eager trial run is adopted, so the graph reads and advances real state.
    (Traced as a first call's initialization, the baseline was each step's own cost, a zero
    score-function gradient, and the objective kept a fake tensor after the run.)"""
    from pyro_elbo.compile.torch_internals import is_fake

    model, guide = _discrete_pair()
    objective = pyro_elbo.ELBO()
    seen: list[Tensor] = []

    def record(step: int, loss: float) -> bool:
        seen.append(objective.state_dict()["baseline"]["k"].clone())
        return True

    pyro_elbo.fit(
        model, guide, objective=objective, num_steps=4, compile=True, progress=False, seed=0, callbacks=[record]
    )
    assert not any(is_fake(value) for value in seen)
    assert len({float(value) for value in seen}) == len(seen), seen  # it moves every step
    logits = pyro.param("logits").detach()
    assert float(logits[0]) != float(logits[1])  # the score term trained them
