"""Whole-step capture on small models that reproduce what real models do.

Each capturable pattern is checked for parity: the captured step run without compiling
(``compile_backend="eager"``: the same random draws as the eager path) takes the same steps as
eager training. Each pattern that cannot be captured falls back with a warning that names the
line of the model or guide, the operation, and what to change, and never torch's internals.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from capture_models import masked_sizes_compared_in_the_package
from pyro.distributions.transforms import batchnorm, iterated, planar
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormalizingFlow
from pyro.nn import PyroModule, PyroSample
from torch import Tensor, nn

import pyro_elbo

#: what a message must never show: torch's symbol names and the exception it wraps
TORCH_INTERNALS = ("u0", "zuf0", "Eq(", "GuardOnDataDependentSymNode", "<string>")


def _fit(make: Callable[[], tuple[Any, Any, tuple[Any, ...]]], compile: bool) -> tuple[Any, list[str]]:
    """Three steps from a fresh, seeded model; the result and the fallback warnings."""
    pyro.clear_param_store()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, guide, args = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pyro_elbo.fit(
            model, guide, *args, num_steps=3, lr=0.01, seed=0, progress=False, compile=compile, compile_backend="eager"
        )
    return result, [str(w.message) for w in caught if "falling back" in str(w.message)]


def _assert_parity(make: Callable[[], tuple[Any, Any, tuple[Any, ...]]]) -> None:
    eager, _ = _fit(make, compile=False)
    captured, fallbacks = _fit(make, compile=True)
    assert not fallbacks, fallbacks[0]
    assert captured.compile_seconds is not None
    # float32 rounding: the graph may order sums differently (1e-6 relative on O(100) losses)
    torch.testing.assert_close(torch.tensor(captured.history), torch.tensor(eager.history))
    for key, value in eager.params.items():
        torch.testing.assert_close(captured.params[key], value, msg=f"parameter {key} after 3 steps")


def _fallback_message(make: Callable[[], tuple[Any, Any, tuple[Any, ...]]]) -> str:
    _, fallbacks = _fit(make, compile=True)
    assert len(fallbacks) == 1, fallbacks
    for internal in TORCH_INTERNALS:
        assert internal not in fallbacks[0], fallbacks[0]
    return fallbacks[0]


def _line_of(text: str, function: Callable[..., Any]) -> str:
    """``test_capture.py:N``, the line of ``function`` that contains ``text``."""
    lines, first = inspect.getsourcelines(function)
    number = first + next(i for i, line in enumerate(lines) if text in line)
    return f"test_capture.py:{number}"


# --- PyroSample priors built while validation is on (the "Bayesian regression" tutorial) --------


class _Regression(PyroModule):
    def __init__(self) -> None:
        super().__init__()
        self.linear = PyroModule[nn.Linear](3, 1)  # type: ignore[call-arg, arg-type]  # PyroModule[...] is untyped
        # built with Pyro's validation on: the prior checks every sample against its support
        self.linear.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, 3]).to_event(2))
        self.linear.bias = PyroSample(dist.Normal(0.0, 10.0).expand([1]).to_event(1))

    def forward(self, x: Tensor, y: Tensor) -> None:
        sigma = pyro.sample("sigma", dist.Uniform(0.0, 10.0))
        mean = self.linear(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mean, sigma), obs=y)


def _regression() -> tuple[Any, Any, tuple[Any, ...]]:
    model = _Regression()
    x = torch.randn(20, 3)
    return model, AutoDiagonalNormal(model), (x, x.sum(-1) + 0.1 * torch.randn(20))


def test_pyro_sample_priors_with_validation_capture() -> None:
    """A distribution made with ``validate_args`` on keeps checking its samples even when the
    default is off; the capture must not trace that check (a guard on data, ``Eq(u0, 1)``)."""
    with pyro.validation_enabled(True):
        assert dist.Normal(0.0, 1.0)._validate_args
        _assert_parity(_regression)
        assert dist.Normal(0.0, 1.0)._validate_args, "validation is on again after the capture"


# --- normalizing-flow guides whose transforms read their parameters outside a forward ------------


def _hierarchical(y: Tensor) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    with pyro.plate("groups", y.shape[0]):
        theta = pyro.sample("theta", dist.Normal(mu, 2.0))
        pyro.sample("obs", dist.Normal(theta, 1.0), obs=y)


def test_planar_flow_guide_captures() -> None:
    """A planar flow reads ``bias``, ``u``, ``w`` in ``_call``, not in a ``forward``, and
    ``AutoNormalizingFlow`` keeps its first flow parameter a second time as ``_prototype_tensor``:
    the capture must put the parameter's input in both places (else it is baked in, refused)."""
    _assert_parity(
        lambda: (
            _hierarchical,
            AutoNormalizingFlow(_hierarchical, functools.partial(iterated, 2, planar)),
            (torch.randn(4),),
        )
    )


def _closure_flow() -> tuple[Any, Any, tuple[Any, ...]]:
    """Pyro's normalizing-flow tutorial: a flow registered with ``pyro.module`` in a hand-written
    guide, used as the transform of a ``TransformedDistribution``."""
    flow = T.Planar(2)

    def model(x: Tensor) -> None:
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(x: Tensor) -> None:
        pyro.module("flow", flow)
        base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
        pyro.sample("z", dist.TransformedDistribution(base, [flow]))

    return model, guide, (torch.randn(6, 2),)


def test_flow_in_a_guide_closure_captures() -> None:
    _assert_parity(_closure_flow)


#: a flow at the top of a user's script, named by the guide as a global
GLOBAL_FLOW = T.Radial(2)


def _global_flow() -> tuple[Any, Any, tuple[Any, ...]]:
    GLOBAL_FLOW.reset_parameters()  # seeded by _fit: both runs start from the same flow
    model = _closure_flow()[0]

    def guide(x: Tensor) -> None:
        pyro.module("flow", GLOBAL_FLOW)
        base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
        pyro.sample("z", dist.TransformedDistribution(base, [GLOBAL_FLOW]))

    return model, guide, (torch.randn(6, 2),)


def test_flow_named_as_a_global_captures() -> None:
    _assert_parity(_global_flow)


def test_batchnorm_flow_guide_captures_from_the_same_state() -> None:
    """A ``BatchNorm`` flow updates its moving averages when scoring (``_inverse``) and reads them
    when sampling (``_call``): one extra eager run before the capture changes the first loss."""
    _assert_parity(
        lambda: (
            _hierarchical,
            AutoNormalizingFlow(_hierarchical, functools.partial(iterated, 2, batchnorm)),
            (torch.randn(4),),
        )
    )


def _encoded(encoder: nn.Module) -> tuple[Callable[[Tensor], None], Callable[[Tensor], None]]:
    def model(x: Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(z.unsqueeze(-1), 1.0).to_event(1), obs=x)

    def guide(x: Tensor) -> None:
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            h = encoder(x)
            pyro.sample("z", dist.Normal(h[:, 0], h[:, 1].exp()))

    return model, guide


def test_running_statistics_move_once_per_step() -> None:
    """``nn.BatchNorm1d`` in the guide: after the same steps, the compiled path has counted as many
    batches as the eager one (the capture's own runs leave no trace in the running statistics)."""
    counts = []
    for compile in (False, True):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            norm = nn.BatchNorm1d(4)
            encoder = nn.Sequential(nn.Linear(3, 4), norm, nn.Linear(4, 2))
        model, guide = _encoded(encoder)
        _fit(lambda: (model, guide, (torch.randn(8, 3),)), compile=compile)  # noqa: B023 (called at once)
        assert norm.num_batches_tracked is not None
        counts.append(int(norm.num_batches_tracked))
    assert counts[0] == counts[1], counts


# --- sequences: a GRU guide over padded, masked sequences (the deep Markov model) ---------------


class _Sequences(nn.Module):
    """A small deep Markov model: GRU guide, ``pyro.markov``, ``poutine.scale``, masks."""

    def __init__(self, packed: bool) -> None:
        super().__init__()
        self.packed = packed
        self.rnn = nn.GRU(input_size=3, hidden_size=4, batch_first=True)
        self.loc, self.emit = nn.Linear(4 + 2, 2), nn.Linear(2, 3)

    def model(self, seqs: Tensor, mask: Tensor, lengths: Tensor) -> None:
        pyro.module("seq", self)
        z = seqs.new_zeros(seqs.shape[0], 2)
        with pyro.plate("batch", seqs.shape[0]):
            for t in pyro.markov(range(seqs.shape[1])):
                with pyro.poutine.scale(scale=0.5):
                    z = pyro.sample(f"z_{t}", dist.Normal(z, 1.0).mask(mask[:, t : t + 1]).to_event(1))
                logits = self.emit(z)
                pyro.sample(
                    f"x_{t}", dist.Bernoulli(logits=logits).mask(mask[:, t : t + 1]).to_event(1), obs=seqs[:, t]
                )

    def guide(self, seqs: Tensor, mask: Tensor, lengths: Tensor) -> None:
        pyro.module("seq", self)
        if self.packed:
            packed = nn.utils.rnn.pack_padded_sequence(seqs, lengths, batch_first=True, enforce_sorted=False)
            hidden, _ = self.rnn(packed)
            hidden = nn.utils.rnn.pad_packed_sequence(hidden, batch_first=True, total_length=seqs.shape[1])[0]
        else:
            hidden, _ = self.rnn(seqs)  # padded: steps past a sequence's end are masked out below
        z = seqs.new_zeros(seqs.shape[0], 2)
        with pyro.plate("batch", seqs.shape[0]):
            for t in pyro.markov(range(seqs.shape[1])):
                loc = self.loc(torch.cat([hidden[:, t], z], -1))
                with pyro.poutine.scale(scale=0.5):
                    z = pyro.sample(f"z_{t}", dist.Normal(loc, 1.0).mask(mask[:, t : t + 1]).to_event(1))


def _sequences(packed: bool) -> tuple[Any, Any, tuple[Any, ...]]:
    net = _Sequences(packed)
    lengths = torch.tensor([3, 2, 3, 1])
    mask = (torch.arange(3) < lengths.unsqueeze(-1)).to(torch.get_default_dtype())
    seqs = torch.bernoulli(torch.full((4, 3, 3), 0.4)) * mask.unsqueeze(-1)
    return net.model, net.guide, (seqs, mask, lengths)


def test_masked_sequence_model_captures() -> None:
    _assert_parity(lambda: _sequences(packed=False))


def test_packed_sequences_fall_back_naming_pack_padded_sequence_and_the_line() -> None:
    message = _fallback_message(lambda: _sequences(packed=True))
    assert "the guide" in message and "pack_padded_sequence" in message, message
    assert _line_of("hidden, _ = self.rnn(packed)", _Sequences.guide) in message, message
    assert "mask" in message and "compile=False" in message, message


# --- two modules registered under one name (Pyro's CEVAE: model and guide both have a t_nn) -----


class _ClashingModel(PyroModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 1))  # "net$$$0.weight": the guide registers that name first

    def forward(self, x: Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(self.net(z).squeeze(-1), 1.0), obs=x)


class _ClashingGuide(PyroModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, 3), nn.Tanh(), nn.Linear(3, 4))

    def forward(self, x: Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = self.net(x.unsqueeze(-1)).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def test_parameters_outside_the_param_store_compile_as_constants() -> None:
    """The model's ``net.0`` is shadowed in the param store by the guide's: neither the eager path
    nor Pyro trains it, and the graph holds it as a constant. AOTAutograd (under inductor and
    ``torch.compile``) differentiated the graph again because that constant required grad, and
    failed on the step's in-place writes; the step now compiles (``aot_eager``: AOTAutograd with
    the eager path's draws) and takes the eager path's steps."""

    def fit(compile_backend: str | None) -> tuple[Any, list[str]]:
        pyro.clear_param_store()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, guide, x = _ClashingModel(), _ClashingGuide(), torch.randn(10)
        shadowed = model.net[0].weight.detach().clone()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = pyro_elbo.fit(
                model, guide, x, num_steps=5, lr=0.01, seed=0, progress=False,
                compile=compile_backend is not None, compile_backend=compile_backend or "inductor",
            )  # fmt: skip
        assert torch.equal(model.net[0].weight, shadowed)  # read, never trained
        return result, [str(w.message) for w in caught if "falling back" in str(w.message)]

    eager, _ = fit(None)
    compiled, fallbacks = fit("aot_eager")
    assert not fallbacks, fallbacks[0]
    torch.testing.assert_close(torch.tensor(compiled.history), torch.tensor(eager.history))
    for key, value in eager.params.items():
        torch.testing.assert_close(compiled.params[key], value, msg=f"parameter {key} after 5 steps")


# --- a Python value taken from a tensor --------------------------------------------------------


def _branching() -> tuple[Any, Any, tuple[Any, ...]]:
    def model(x: Tensor) -> None:
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        if float(z) > 0:
            pyro.factor("bonus", torch.tensor(0.1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(z, 1.0), obs=x)

    def guide(x: Tensor) -> None:
        pyro.sample("z", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

    return model, guide, (torch.randn(5),)


def test_python_branch_on_a_tensor_names_the_line() -> None:
    message = _fallback_message(_branching)
    model = _branching()[0]
    assert "the model" in message and f"test_capture.py:{model.__code__.co_firstlineno + 2}" in message, message
    assert "if float(z) > 0:" in message and "torch.where" in message, message


def _two_masked_selections() -> tuple[Any, Any, tuple[Any, ...]]:
    """The CVAE example's pattern: the observed entries and their means selected by masks made
    from the data (two mask tensors: two data-dependent sizes, first compared by the package's
    shape check of the observed site, after the model returned)."""

    def model(x: Tensor) -> None:
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        keep = x != -1
        means = (z * torch.ones_like(x))[keep]
        pyro.sample("obs", dist.Normal(means, 1.0).to_event(1), obs=x[x != -1])

    def guide(x: Tensor) -> None:
        pyro.sample("z", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

    return model, guide, (torch.tensor([0.5, -1.0, 1.5, -1.0, 0.2]),)


def test_sizes_made_from_data_capture() -> None:
    """The site checks compare sizes only as numbers (the eager run before the capture checks
    them), so sizes the capture has only as symbols pass through."""
    _assert_parity(_two_masked_selections)


def test_a_size_compared_in_a_package_check_is_blamed_on_the_users_line() -> None:
    message = _fallback_message(masked_sizes_compared_in_the_package)
    model = masked_sizes_compared_in_the_package()[0]
    lines = [
        line.replace("test_capture.py", "capture_models.py")
        for line in (_line_of("kept = ", model), _line_of("shifted = ", model))
    ]
    assert "the model" in message and any(line in message for line in lines), message
    assert "pyro_elbo" not in message and ".mask(" in message, message


def test_numpy_in_the_model_is_named() -> None:
    def make() -> tuple[Any, Any, tuple[Any, ...]]:
        _, guide, args = _branching()

        def numpy_model(x: Tensor) -> None:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            shift = torch.as_tensor(z.detach().numpy())
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", dist.Normal(z + shift, 1.0), obs=x)

        return numpy_model, guide, args

    message = _fallback_message(make)
    assert "NumPy" in message and "z.detach().numpy()" in message, message


def test_the_users_line_is_read_from_chained_errors() -> None:
    """A tracer that fails while handling the real error raises an error of its own whose
    traceback holds only torch's frames (and here none at all): the user's line is in the error it
    was raised while handling (``__context__``), or from (``__cause__``)."""
    from pyro_elbo._pyro.capture_failures import describe_failure

    def model_line() -> None:
        raise RuntimeError("cannot trace this")

    try:
        model_line()
    except RuntimeError as error:
        original = error
    line = f"test_capture.py:{model_line.__code__.co_firstlineno + 1}"
    for link in ("__context__", "__cause__"):
        tracer_error = IndexError("list index out of range")  # raised in torch: no frame of the user's
        setattr(tracer_error, link, original)
        message = describe_failure(tracer_error)
        assert line in message and 'raise RuntimeError("cannot trace this")' in message, (link, message)
    assert line not in describe_failure(IndexError("alone"))  # the chain is what names it
