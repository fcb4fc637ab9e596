"""Each private torch internal the compiled path uses (``pyro_elbo.compile.torch_internals``), made to
raise as a torch release that moves or changes it would: ``fit(compile=True)`` degrades to the next
path down (inductor direct -> ``torch.compile`` -> eager) with a warning that says what was lost,
and still trains to the eager answer."""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
import pytest
import torch
from capture_models import masked_sizes_compared_in_the_package

import pyro_elbo
from pyro_elbo._pyro import capture, capture_failures
from pyro_elbo.compile import inductor, rewrites, torch_internals

from models import default_conjugate, relative_tolerance


def _moved(*args: Any, **kwargs: Any) -> Any:
    raise ImportError("cannot import name 'thing' from 'torch._private' (a torch release moved it)")


def _fit_conjugate(**options: Any) -> tuple[pyro_elbo.FitResult, list[str]]:
    """STL on the conjugate model (at the optimum its gradient has no variance, so every path that
    trains lands on the exact posterior); the RuntimeWarnings it gave."""
    c = default_conjugate()
    pyro.clear_param_store()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pyro_elbo.fit(
            c.model, c.guide_at(0.0, 1.0), 2, objective=pyro_elbo.STL(), num_steps=300, lr=0.05, seed=0,
            progress=False, **options,
        )  # fmt: skip
    for name, value in (("loc", c.post_loc), ("scale", c.post_scale)):
        assert torch.allclose(result.params[name], torch.full((2,), value), atol=0.02), (name, result.params[name])
    return result, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.mark.slow  # torch.compile compiles the graph: 30-60 s on two shared cores
@pytest.mark.parametrize("internal", ["compile_fx", "shape_env_context", "cache_counters"])
def test_inductor_direct_degrades_to_torch_compile(internal: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inductor, internal, _moved)
    result, messages = _fit_conjugate(compile=True)
    assert len(messages) == 1 and "compiled by torch.compile instead" in messages[0], messages
    assert "without inductor's on-disk caches" in messages[0] and "a torch release moved it" in messages[0]
    assert result.compile_seconds is not None


def test_cpu_vec_isa_unimportable_still_trains(monkeypatch: pytest.MonkeyPatch) -> None:
    """The module torch releases have moved before: the background check is skipped, and the
    compile either works without it or falls back; never a crash. (torch's own modules are imported
    first: in a release that moves the module, torch's code imports it by its new name.)"""
    importlib.import_module("torch._inductor.compile_fx")
    monkeypatch.setitem(sys.modules, "torch._inductor.cpu_vec_isa", None)
    monkeypatch.setattr(torch_internals, "_cpu_check", None)
    _, messages = _fit_conjugate(compile=True)
    assert torch_internals._cpu_check is None  # the head start was skipped, not half started
    assert all("torch.compile instead" in m or "falling back to the eager path" in m for m in messages), messages


def test_torch_compile_failing_too_degrades_to_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inductor direct and ``torch.compile`` both unusable: the eager step, on the eager draws."""
    monkeypatch.setattr(inductor, "compile_fx", _moved)
    monkeypatch.setattr(torch, "compile", _moved)
    result, messages = _fit_conjugate(compile=True)
    assert len(messages) == 2, messages
    assert "torch.compile instead" in messages[0]
    assert "falling back to the eager path because capturing or compiling the step failed inside torch" in messages[1]
    assert "a torch release moved it" in messages[1]
    eager, none = _fit_conjugate(compile=False)
    assert none == [] and result.history == eager.history


def test_make_fx_failing_degrades_to_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(capture, "trace_fake", _moved)
    result, messages = _fit_conjugate(compile=True, compile_backend="eager")
    assert len(messages) == 1 and "falling back to the eager path" in messages[0], messages
    eager, _ = _fit_conjugate(compile=False)
    assert result.history == eager.history


def _fit_against_eager(
    model: Callable[[], None], guide: Callable[[], None], monkeypatch: pytest.MonkeyPatch, internal: str
) -> list[str]:
    """Fit compiled (the captured graph run uncompiled: the eager path's draws) with ``internal``
    of the graph rewrites raising, and eagerly; the losses must agree. Returns the warnings."""

    def run(compile_: bool) -> tuple[list[float], list[str]]:
        pyro.clear_param_store()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = pyro_elbo.fit(
                model, guide, num_steps=20, seed=1, compile=compile_, compile_backend="eager", progress=False
            )
        return result.history, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]

    eager, _ = run(False)
    with monkeypatch.context() as patch:
        patch.setattr(rewrites, internal, _moved)
        compiled, messages = run(True)
    assert compiled == pytest.approx(eager, rel=relative_tolerance())
    return messages


def test_fake_metadata_failing_skips_the_linalg_rewrite(monkeypatch: pytest.MonkeyPatch) -> None:
    """``fake_mode_of`` (``torch._guards.detect_fake_mode``) gives the new nodes their metadata."""

    def model() -> None:
        pyro.sample("z", dist.MultivariateNormal(torch.zeros(2), torch.eye(2)))

    def guide() -> None:
        factor = pyro.param("factor", torch.tensor([[0.5, 0.1], [0.0, 0.5]]))
        covariance = factor @ factor.T + 0.1 * torch.eye(2)  # a Cholesky inside the step
        pyro.sample("z", dist.MultivariateNormal(pyro.param("loc", torch.zeros(2)), covariance_matrix=covariance))

    messages = _fit_against_eager(model, guide, monkeypatch, "fake_mode_of")
    assert len(messages) == 1 and "the graph rewrite linalg_errors_as_nan failed" in messages[0], messages
    assert "a failed factorization raises" in messages[0]


def test_fake_tensor_check_failing_skips_the_mask_rewrite(monkeypatch: pytest.MonkeyPatch) -> None:
    """``is_fake`` (``torch._subclasses.FakeTensor``) tells a constant mask from a traced value."""
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0])  # a float buffer converted to bool, as BNAF does

    def model() -> None:
        pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    def guide() -> None:
        selected = pyro.param("loc", torch.zeros(4))[mask.bool()]  # a data-dependent shape without the rewrite
        pyro.sample("z", dist.Normal(selected.sum() + torch.zeros(3), 1.0).to_event(1))

    messages = _fit_against_eager(model, guide, monkeypatch, "is_fake")
    assert len(messages) == 1 and "the graph rewrite constant_masks_as_indices failed" in messages[0], messages


def test_data_dependent_check_failing_still_names_the_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """``is_data_dependent`` (``GuardOnDataDependentSymNode``) only sharpens the message."""
    monkeypatch.setattr(capture_failures, "is_data_dependent", _moved)

    def model() -> None:
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        if float(z.detach()) > 0:  # a data-dependent Python branch cannot be captured
            pyro.factor("bonus", torch.tensor(0.1))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.5))

    def guide() -> None:
        pyro.sample("z", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

    with pytest.warns(RuntimeWarning, match="falling back to the eager path") as caught:
        result = pyro_elbo.fit(model, guide, num_steps=5, compile=True, compile_backend="eager", progress=False)
    assert len(caught) == 1 and "test_torch_internals.py" in str(caught[0].message), str(caught[0].message)
    assert len(result.history) == 5


def test_size_origins_failing_still_fall_back_and_train(monkeypatch: pytest.MonkeyPatch) -> None:
    """``data_dependent_origins`` (the shape environment's record of where a data-dependent size
    was made) only sharpens the message: raising, the step still falls back with one warning that
    names the user's line, not the package's, and trains as the eager path does."""
    monkeypatch.setattr(capture_failures, "data_dependent_origins", _moved)
    model, guide, args = masked_sizes_compared_in_the_package()

    def run(compile_: bool) -> tuple[list[float], list[str]]:
        pyro.clear_param_store()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = pyro_elbo.fit(
                model, guide, *args, num_steps=5, seed=1, compile=compile_, compile_backend="eager", progress=False
            )
        return result.history, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]

    compiled, messages = run(True)
    assert len(messages) == 1 and "falling back to the eager path" in messages[0], messages
    assert "test_torch_internals.py" not in messages[0] and "capture_models.py" in messages[0], messages[0]
    assert "pyro_elbo" not in messages[0], messages[0]
    assert compiled == run(False)[0]


def test_a_renamed_private_operation_leaves_its_rewrite_nothing_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rewrites look for private aten operations (``_linalg_check_errors``, ``_to_copy``...):
    in a torch without them the rewrite finds nothing, and the graph still runs."""

    def cholesky_logdet(a: torch.Tensor) -> torch.Tensor:
        return torch.linalg.cholesky(a).diagonal().log().sum()

    a = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    assert rewrites.linalg_errors_as_nan(torch_internals.trace_fake(cholesky_logdet, [a])) == 1
    real = rewrites._overload
    monkeypatch.setattr(
        rewrites,
        "_overload",
        lambda name, overload="default": None if name.startswith("_") else real(name, overload),
    )
    graph = torch_internals.trace_fake(cholesky_logdet, [a])
    assert rewrites.linalg_errors_as_nan(graph) == 0 and rewrites.constant_masks_as_indices(graph) == 0
    assert torch.equal(graph(a), cholesky_logdet(a))


def test_operator_counting_unavailable_runs_the_block_uncounted(monkeypatch: pytest.MonkeyPatch) -> None:
    """``compile="auto"`` counts a probe step's operators to expect a compile's cost; without the
    dispatch mode the step still runs (the count is ``None``: a compile of a typical size is expected)."""
    with torch_internals.counting_operators() as counted:
        value = torch.ones(3).mul(2.0).sum()
    assert counted.count == 3 and float(value) == 6.0  # ones, mul, sum
    monkeypatch.setitem(sys.modules, "torch.utils._python_dispatch", None)
    with torch_internals.counting_operators() as counted:
        value = torch.ones(3).mul(2.0).sum()
    assert counted.count is None and float(value) == 6.0
    from pyro_elbo.train import autocompile

    assert autocompile.expected_compile_seconds(None) == autocompile.EXPECTED_COMPILE_SECONDS
