"""The lean compiled Adam step (pyro_elbo.compile.flat): parameters and Adam moments in flat
buffers, non-finite steps kept out inside the graph, losses read lazily. It must give eager Adam's
parameters on the same draws, keep the parameter objects, survive a reload and ``p.data = ...``,
and refuse or skip a non-finite step leaving parameters and Adam state exactly as they were."""

from __future__ import annotations

import math
from typing import Any

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints
from torch.utils.data import DataLoader, TensorDataset

import pyro_elbo
from pyro_elbo.train import TrainState, init, step
from pyro_elbo.train.hooks import Hook

from models import relative_tolerance

X = torch.tensor([0.5, 1.5, 1.0, -0.3, 0.8])


def model(x: torch.Tensor) -> None:
    z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(z.sum(-1), 1.0), obs=x)


def guide(x: torch.Tensor) -> None:
    loc = pyro.param("loc", torch.zeros(2))
    scale = pyro.param("scale", torch.ones(2), constraint=constraints.positive)
    pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def _state(compile: bool, **options: Any) -> TrainState:
    pyro.clear_param_store()
    return init(model, guide, X, objective=pyro_elbo.IWAE(num_particles=3), lr=0.05, seed=1, compile=compile,
                compile_backend="eager", optimizer_options={"foreach": False}, **options)  # fmt: skip


def _adam_state(state: TrainState) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().clone() for k, v in state.optimizer.state[p].items()} for p in state.params.values()]


def test_flat_step_equals_eager_adam_on_the_same_draws_and_keeps_the_parameter_objects() -> None:
    runs = {}
    for compile_ in (False, True):
        state = _state(compile_)
        objects = {name: id(p) for name, p in state.params.items()}
        losses = [step(state)[1].loss for _ in range(15)]
        assert {name: id(p) for name, p in state.params.items()} == objects
        assert all(pyro.get_param_store()._params[n] is p for n, p in state.params.items())
        runs[compile_] = (state, losses)
    eager, lean = runs[False][0], runs[True][0]
    assert lean.flat is not None  # the flat path ran, not the per-parameter fallback
    assert lean.history == pytest.approx(runs[False][1], rel=relative_tolerance())
    assert lean.history == runs[True][1]  # the lazily read history is the losses the steps returned
    for name in eager.params:
        assert torch.allclose(lean.params[name], eager.params[name], rtol=relative_tolerance(), atol=1e-7)
    for e, c in zip(_adam_state(eager), _adam_state(lean)):
        assert float(e["step"]) == float(c["step"]) == 15
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(c[key], e[key], rtol=relative_tolerance(), atol=1e-9)


def test_the_copy_back_path_of_cuda_equals_the_in_place_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the flat graph returns its buffers for the caller to copy (a graph that writes its
    inputs does not run as CUDA graphs); run that path on the CPU: same parameters, Adam state and
    skip count as the in-place path, on the same draws."""
    import pyro_elbo.compile.graph

    data = [True, False, True, True]
    runs = {}
    with pyro.validation_enabled(False):
        for writes in (True, False):
            monkeypatch.setattr(pyro_elbo.compile.graph, "graph_writes_inputs", lambda device, w=writes: w)
            state, _, raised = _run(8, data, on_nonfinite="skip")
            assert raised is None
            state.settle()
            runs[writes] = state
    in_place, copied = runs[True], runs[False]
    assert copied.num_skipped == in_place.num_skipped == 1
    assert (
        torch.tensor(copied.history).nan_to_num(7.0).tolist() == torch.tensor(in_place.history).nan_to_num(7.0).tolist()
    )
    for name, value in in_place.params.items():
        assert torch.equal(copied.params[name].detach(), value.detach()), name
    for a, b in zip(_adam_state(in_place), _adam_state(copied)):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_reload_and_replaced_storage_rebind_the_buffers() -> None:
    """A load_state_dict replaces the optimizer's state and p.data = ... moves a parameter: the
    next step lays the buffers out again, so a reload continues exactly where it was saved."""
    state = _state(True)
    for _ in range(5):
        step(state)
    saved = state.state_dict()
    saved = {**saved, "params": {k: v.clone() for k, v in saved["params"].items()},
             "optimizer": _deep(saved["optimizer"])}  # fmt: skip
    for _ in range(5):
        step(state)
    after = {n: p.detach().clone() for n, p in state.params.items()}
    state.load_state_dict(saved)
    for _ in range(5):
        step(state)
    assert state.flat is not None  # laid out again (the parameters' old views do not overlap)
    for name, value in after.items():
        assert torch.equal(state.params[name].detach(), value), name
    first = next(iter(state.params.values()))
    first.data = first.data.clone()  # moved out of the flat buffer
    before = first.detach().clone()
    step(state)
    assert state.flat is not None and first.untyped_storage().data_ptr() == state.flat.flat.untyped_storage().data_ptr()
    assert not torch.equal(first.detach(), before)  # still trained


def test_data_changed_in_place_gets_a_graph_of_its_own_and_the_same_data_keeps_its_graph() -> None:
    """The graph is repeated while the step gets the same data objects (a new tuple of them too);
    the same object given other contents (``x.data = ...``) of another shape, dtype or strides gets
    a new graph (compiled graphs do not check their inputs' layout)."""
    x = X.clone()
    pyro.clear_param_store()
    with pyro.validation_enabled(False):
        state = init(model, guide, x, objective=pyro_elbo.IWAE(num_particles=3), lr=0.05, seed=1, compile=True,
                     compile_backend="eager", optimizer_options={"foreach": False})  # fmt: skip
        assert state.compiled is not None
        graphs = state.compiled.graphs
        for _ in range(3):
            step(state)
        for _ in range(3):
            step(state, x)  # a new args tuple of the same tensor each call
        assert len(graphs) == 1
        counts = []
        for data in (torch.cat([X, X]), X.clone().double(), torch.cat([X, X])[::2]):
            x.data = data
            losses = [step(state)[1].loss for _ in range(2)]
            assert all(math.isfinite(loss) for loss in losses)
            counts.append(len(graphs))
    assert counts == [2, 3, 4]


def test_a_learning_rate_changed_between_steps_is_the_next_steps() -> None:
    """A float learning rate replaced, and a tensor learning rate changed in place: the next step
    uses the new value (at 0 it changes no parameter)."""
    state = _state(True)
    for _ in range(3):
        step(state)
    group = state.optimizer.param_groups[0]
    for lr, frozen in ((0.0, True), (torch.tensor(0.05), False), (None, True)):
        if lr is None:  # the same tensor, set to 0 in place
            group["lr"].fill_(0.0)
        else:
            group["lr"] = lr
        before = {n: p.detach().clone() for n, p in state.params.items()}
        step(state)
        unchanged = [torch.equal(state.params[n].detach(), value) for n, value in before.items()]
        assert all(unchanged) if frozen else not any(unchanged), lr


def _deep(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _deep(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep(v) for v in value]
    return value


def _bad_data() -> torch.Tensor:
    bad = X.clone()
    bad[2] = math.nan
    return bad


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])  # inductor: ~15 s
def test_a_nonfinite_step_is_refused_leaving_parameters_and_adam_state_exactly(backend: str) -> None:
    """Under "raise" the failing step writes nothing and the error names the site: with the
    step's own draws replayed (eager backend), or at the parameters before it with new draws."""
    pyro.clear_param_store()
    with pyro.validation_enabled(False):
        state = init(model, guide, X, objective=pyro_elbo.ELBO(), lr=0.05, compile=True, compile_backend=backend)
        for _ in range(3):
            step(state)
        params = {n: p.detach().clone() for n, p in state.params.items()}
        adam = _adam_state(state)
        with pytest.raises(pyro_elbo.NonFiniteLossError, match="step 3: .*model site 'x'") as raised:
            step(state, _bad_data())  # the eager backend reads the ledger every step; inductor every 256
            state.settle()
    assert ("new draws" in str(raised.value)) == (backend != "eager")
    assert state.flat is not None and state.step == 3
    for name, value in params.items():
        assert torch.equal(state.params[name].detach(), value), name
    for before, now in zip(adam, _adam_state(state)):
        assert before.keys() == now.keys() and all(torch.equal(before[k], now[k]) for k in before)


def test_without_the_steps_draws_the_site_is_found_with_new_draws() -> None:
    """What an inductor graph's failure does (its draws cannot be replayed), on the eager backend."""
    from pyro_elbo.train.nonfinite import find_nonfinite_site

    pyro.clear_param_store()
    state = init(model, guide, X, objective=pyro_elbo.ELBO(), compile=True, compile_backend="eager")
    rng = torch.get_rng_state()
    with pyro.validation_enabled(False):
        message = find_nonfinite_site(state, (_bad_data(),), {}, None)
    assert "model site 'x'" in message and "new draws" in message
    assert torch.equal(torch.get_rng_state(), rng)  # the search does not move the random stream


def test_a_nonfinite_step_is_skipped_and_consecutive_skips_stop() -> None:
    with pyro.validation_enabled(False):
        state = _state(True, on_nonfinite="skip", max_consecutive_skips=2)
        step(state)
        params = {n: p.detach().clone() for n, p in state.params.items()}
        adam = _adam_state(state)
        _, info = step(state, _bad_data())
        assert not info.finite and math.isnan(info.loss) and state.num_skipped == 1
        for name, value in params.items():
            assert torch.equal(state.params[name].detach(), value), name
        for before, now in zip(adam, _adam_state(state)):
            assert all(torch.equal(before[k], now[k]) for k in before)
        _, info = step(state)
        assert info.finite and state.consecutive_skips == 0
        assert not torch.equal(state.params["loc"].detach(), params["loc"])
        step(state, _bad_data())
        with pytest.raises(pyro_elbo.NonFiniteLossError, match="2 consecutive"):
            step(state, _bad_data())
    assert state.num_skipped == 3 and len(state.history) == 4 and math.isnan(state.history[1])


def _counting_ledger_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from pyro_elbo.compile.flat import FlatAdam

    reads: list[int] = []
    original = FlatAdam.read_ledger

    def counted(self: FlatAdam) -> tuple[int, int, int]:
        reads.append(1)
        return original(self)

    monkeypatch.setattr(FlatAdam, "read_ledger", counted)
    return reads


def _run(settle_every: int, data: list[bool], **options: Any) -> tuple[TrainState, list[Any], Exception | None]:
    """Steps on good (True) or bad (False) data with the ledger read every ``settle_every``
    steps; returns the state, the parameters after each step and what was raised."""
    state = _state(True, **options)
    state.settle_every = settle_every
    after: list[Any] = []
    try:
        for good in data:
            step(state) if good else step(state, _bad_data())
            after.append({n: p.detach().clone() for n, p in state.params.items()})
    except pyro_elbo.NonFiniteLossError as error:
        return state, after, error
    return state, after, None


def test_the_ledger_is_read_every_settle_every_steps_not_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    reads = _counting_ledger_reads(monkeypatch)
    state, _, raised = _run(8, [True] * 20)
    assert raised is None and len(reads) == 2  # after steps 8 and 16, none per step
    state.result()
    assert len(reads) == 3 and not state.unsettled  # the result reads the last 4 steps' ledger


def test_a_refused_step_raises_at_the_next_read_with_the_run_as_before_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under "raise", a non-finite step halts the ledger: it and the steps after it change nothing,
    and the next read raises for it with its number and site, the parameters, Adam state, losses,
    timings and step count as they were before it; the run can then go on."""
    reads = _counting_ledger_reads(monkeypatch)
    with pyro.validation_enabled(False):
        state, after, raised = _run(8, [True, True, True, False, True, True, True, True, True])
        assert isinstance(raised, pyro_elbo.NonFiniteLossError) and len(reads) == 1
        assert len(after) == 7  # the 8th call read the ledger and raised
        message = str(raised)
        assert message.startswith("step 3: ") and "model site 'x'" in message and "new draws" in message
        assert state.step == 3 and len(state.history) == 3 and len(state.step_seconds) == 3
        assert all(math.isfinite(v) for v in state.history)
        for later in after[3:]:
            for name, value in after[2].items():
                assert torch.equal(later[name], value), name
        assert all(float(s["step"]) == 3 for s in _adam_state(state))
        _, info = step(state)  # the ledger was reset: training goes on
        assert info.finite and not torch.equal(state.params["loc"].detach(), after[2]["loc"])


def test_skips_counted_on_the_device_match_the_eager_reading() -> None:
    """Under "skip" the ledger skips non-finite steps and halts after max_consecutive_skips in a
    row: read every 8 steps, the run ends at the same step, with the same count, history and
    parameters (the same draws) as read every step."""
    data = [True, False, True, False, False, True, True, True]
    runs = {}
    with pyro.validation_enabled(False):
        for every in (1, 8):
            state, after, raised = _run(every, data, on_nonfinite="skip", max_consecutive_skips=2)
            assert isinstance(raised, pyro_elbo.NonFiniteLossError)
            assert "2 consecutive non-finite steps (last at step 4)" in str(raised)
            runs[every] = (state, after)
    (one, after_one), (eight, after_eight) = runs[1], runs[8]
    assert len(after_one) == 4 and len(after_eight) == 7
    assert one.step == eight.step == 4 and one.num_skipped == eight.num_skipped == 3
    assert one.history[0] == eight.history[0] and math.isnan(eight.history[1]) and len(eight.history) == 4
    for name, value in one.params.items():
        assert torch.equal(eight.params[name].detach(), value.detach()), name


def test_a_checkpoint_is_not_written_past_a_refused_step() -> None:
    with pyro.validation_enabled(False):
        state, _, raised = _run(8, [True, False, True])
        assert raised is None
        with pytest.raises(pyro_elbo.NonFiniteLossError, match="step 1: "):
            state.state_dict()
    assert state.step == 1


class _ReadRarely(Hook):
    """What fit does under inductor (the ledger read every 256 steps), on the eager backend."""

    def on_start(self, state: TrainState) -> None:
        state.settle_every = 256


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_fit_over_minibatches_refuses_or_skips_the_step_of_the_bad_batch(mode: str) -> None:
    """A NaN in the 7th batch of 10 (every epoch): fit reads the ledger only at its end (30 steps
    < 256), yet raises for step 6 on that batch's data, or skips exactly the three bad steps."""
    data = torch.randn(40)
    data[26] = math.nan
    loader = DataLoader(TensorDataset(data), batch_size=4)
    pyro.clear_param_store()
    options: dict[str, Any] = dict(num_epochs=3, compile=True, compile_backend="eager", progress=False, seed=0)
    with pyro.validation_enabled(False):
        if mode == "raise":
            with pytest.raises(pyro_elbo.NonFiniteLossError, match="step 6: .*model site 'x'"):
                pyro_elbo.fit(model, guide, loader, hooks=[_ReadRarely()], **options)
            return
        result = pyro_elbo.fit(model, guide, loader, on_nonfinite="skip", hooks=[_ReadRarely()], **options)
    assert result.num_skipped == 3 and len(result.history) == 30
    assert [i for i, v in enumerate(result.history) if math.isnan(v)] == [6, 16, 26]


@pytest.mark.parametrize(
    "limit, finite, applied, ledger",
    [  # ledger: (limit, consecutive, skipped, calls, halted_at)
        (1, "TFTT", "TFFF", [1, 1, 1, 4, 2]),  # "raise": the first non-finite step halts it
        (3, "TFTFFFTT", "TFTFFFFF", [3, 3, 4, 8, 6]),  # "skip": three in a row halt it
        (3, "FFTFFT", "FFTFFT", [3, 0, 4, 6, 0]),  # never three in a row
    ],
)
def test_guarded_step_halts_after_limit_consecutive_nonfinite_steps(
    limit: int, finite: str, applied: str, ledger: list[int]
) -> None:
    from pyro_elbo.compile.adam import guarded_step

    state = torch.tensor([limit, 0, 0, 0, 0])
    seen = ""
    for flag in finite:
        a, state = guarded_step(torch.tensor(flag == "T"), state)
        seen += "T" if bool(a) else "F"
    assert seen == applied and state.tolist() == ledger


def test_progress_reads_the_loss_only_when_it_redraws() -> None:
    from pyro_elbo.train.hooks import Progress
    from pyro_elbo.train.step import StepInfo

    state = _state(False)
    progress = Progress(total=20, interval=3600.0)
    progress.on_start(state)
    try:
        for _ in range(20):
            state.position.step += 1
            info = StepInfo(state.step, torch.tensor(1.0), True, 0.0)
            progress.on_step(state, info)
            assert isinstance(info._loss, torch.Tensor) == (state.step < 20)  # read only at the last step
        assert progress.bar.n == 20
    finally:
        progress.close()


def test_parameters_that_cannot_share_one_vector_take_the_per_parameter_graph() -> None:
    """Mixed dtypes cannot share a flat buffer: the per-parameter in-graph Adam runs instead and
    still equals eager Adam on the same draws."""

    other = torch.float32 if torch.get_default_dtype() == torch.float64 else torch.float64

    def guide64(x: torch.Tensor) -> None:
        loc = pyro.param("loc", torch.zeros(2))
        scale = pyro.param("scale", torch.ones(2, dtype=other), constraint=constraints.positive)
        pyro.sample("z", dist.Normal(loc, scale.to(loc.dtype)).to_event(1))

    runs = {}
    for compile_ in (False, True):
        pyro.clear_param_store()
        state = init(model, guide64, X, lr=0.05, seed=2, compile=compile_, compile_backend="eager",
                     optimizer_options={"foreach": False})  # fmt: skip
        for _ in range(10):
            step(state)
        runs[compile_] = state
    assert runs[True].flat is None and runs[True].compiled is not None and len(runs[True].compiled.graphs) == 1
    for name, value in runs[False].params.items():
        assert torch.allclose(runs[True].params[name], value, rtol=relative_tolerance(), atol=1e-7), name


def test_fit_returns_parameters_in_their_own_memory_so_saving_one_module_saves_only_it() -> None:
    """While the compiled step runs, every parameter is a view of one shared vector, and torch.save
    writes a view's whole storage: fit gives each parameter its own memory back before it returns
    (values kept), so a decoder's state_dict does not carry the encoder's weights."""
    import io

    encoder, decoder = torch.nn.Linear(6, 200), torch.nn.Linear(2, 6)

    def vae_model(x: torch.Tensor) -> None:
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(decoder(z), 1.0).to_event(1), obs=x)

    def vae_guide(x: torch.Tensor) -> None:
        pyro.module("encoder", encoder)
        h = encoder(x)[..., :4]
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(h[..., :2], h[..., 2:].exp()).to_event(1))

    def saved_bytes() -> int:
        buffer = io.BytesIO()
        torch.save(decoder.state_dict(), buffer)
        return len(buffer.getvalue())

    pyro.clear_param_store()
    before = saved_bytes()
    x = torch.randn(8, 6)
    state = init(vae_model, vae_guide, x, compile=True, compile_backend="eager", seed=0)
    step(state)
    assert state.flat is not None  # the compiled step laid the parameters out in one vector
    assert decoder.weight.untyped_storage().data_ptr() == encoder.weight.untyped_storage().data_ptr()
    value = decoder.weight.detach().clone()
    state.release_flat_buffers()
    assert torch.equal(decoder.weight, value) and saved_bytes() == before
    step(state)  # lays them out again and keeps training
    assert state.flat is not None and not torch.equal(decoder.weight, value)
    pyro.clear_param_store()
    pyro_elbo.fit(vae_model, vae_guide, x, num_steps=2, compile=True, compile_backend="eager", progress=False)
    assert saved_bytes() == before
