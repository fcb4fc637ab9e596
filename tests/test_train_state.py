"""init/step with an explicit TrainState: the same run as fit, a state_dict that continues
bit-identically, hooks, one optimizer parameter per tensor, and a particle count that cannot fit
refused before the first step."""

from __future__ import annotations

import io
import time

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoIAFNormal

import pyro_elbo
from pyro_elbo.train import Hook, StepInfo, TrainState, init, step
from pyro_elbo.train.memory import saved_bytes

from models import default_conjugate


def test_init_and_step_are_the_run_fit_does() -> None:
    c = default_conjugate()
    fitted = pyro_elbo.fit(
        c.model,
        c.guide_at(0.0, 1.0),
        3,
        objective=pyro_elbo.IWAE(num_particles=4),
        num_steps=20,
        seed=4,
        progress=False,
    )
    pyro.clear_param_store()
    state = init(c.model, c.guide_at(0.0, 1.0), 3, objective=pyro_elbo.IWAE(num_particles=4), seed=4)
    infos = []
    for _ in range(20):
        state, info = step(state)
        infos.append(info)
    assert [i.loss for i in infos] == fitted.history == state.history
    assert [i.step for i in infos] == list(range(1, 21)) and all(i.finite for i in infos)
    for name, value in state.constrained_params().items():
        assert torch.equal(value, fitted.params[name]), name


def test_state_dict_continues_bit_identically() -> None:
    c = default_conjugate()
    guide = c.guide_at(0.0, 1.0)
    state = init(
        c.model,
        guide,
        2,
        objective=pyro_elbo.DReG(num_particles=3),
        seed=1,
        scheduler=lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, 0.9),
    )
    for _ in range(5):
        state, _ = step(state)
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    for _ in range(5):
        state, _ = step(state)
    expected = state.constrained_params()  # read through the param store, which is cleared next
    pyro.clear_param_store()
    again = init(
        c.model,
        guide,
        2,
        objective=pyro_elbo.DReG(num_particles=3),
        scheduler=lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, 0.9),
    )
    buffer.seek(0)
    again.load_state_dict(torch.load(buffer, weights_only=True))
    assert again.step == 5
    for _ in range(5):
        again, _ = step(again)
    assert again.history == state.history
    for name, value in expected.items():
        assert torch.equal(again.constrained_params()[name], value), name


class _StopAt(Hook):
    def __init__(self, at: int) -> None:
        self.at, self.seen = at, []

    def on_step(self, state: TrainState, info: StepInfo) -> str | None:
        self.seen.append(info.step)
        return "my_reason" if info.step == self.at else None


def test_a_hook_of_ones_own_stops_fit_with_its_reason() -> None:
    c = default_conjugate()
    hook = _StopAt(7)
    result = pyro_elbo.fit(c.model, c.guide_at(0.0, 1.0), 1, num_steps=50, progress=False, hooks=[hook])
    assert result.stop_reason == "my_reason" and result.num_steps == 7 and hook.seen == list(range(1, 8))


def test_autoiafnormal_reads_one_tensor_under_two_names_and_trains() -> None:
    """Its guide reads one module weight under two parameter names: the optimizer gets it once
    (torch warns about duplicate parameters, an error under -W error)."""

    def model():
        pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    guide = AutoIAFNormal(model, hidden_dim=[4])
    state = init(model, guide)
    tensors = [p for group in state.optimizer.param_groups for p in group["params"]]
    assert len(tensors) == len({id(p) for p in tensors}) == len(state.params)
    before = {k: v.detach().clone() for k, v in state.params.items()}
    state, info = step(state)
    assert info.finite and any(not torch.equal(before[k], v) for k, v in state.params.items())


def test_huge_particle_count_is_refused_before_the_first_step_naming_the_option() -> None:
    c = default_conjugate()
    steps = []
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"num_particles=1000000000 needs at least .* Lower num_particles"):
        pyro_elbo.fit(
            c.model,
            c.guide_at(0.0, 1.0),
            2,
            objective=pyro_elbo.ELBO(num_particles=10**9),
            num_steps=5,
            progress=False,
            callbacks=[lambda step, loss: steps.append(step)],
        )
    assert steps == [] and time.perf_counter() - start < 30
    # a large count that fits passes the check and trains
    result = pyro_elbo.fit(
        c.model, c.guide_at(0.0, 1.0), 2, objective=pyro_elbo.IWAE(num_particles=512), num_steps=2, progress=False
    )
    assert result.num_steps == 2


def test_saved_bytes_grow_linearly_in_the_particles() -> None:
    """The check's model M(S) = a + bS: exact for a vectorized program (same ops, longer dims)."""
    c = default_conjugate()
    guide = c.guide_at(0.0, 1.0)
    objective = pyro_elbo.IWAE(num_particles=8)
    objective.loss(c.model, guide, 2)
    sizes = {}
    for n in (8, 16, 32):
        objective.num_particles = n
        sizes[n] = saved_bytes(objective, c.model, guide, (2,), {})
    assert sizes[32] - sizes[16] == 2 * (sizes[16] - sizes[8]) > 0
