"""Inductor's persistent caches under the compiled step (``pyro_elbo.compile.inductor.compile_graph``).

A second compile of the same graph (same model, constants and input signature) must load the
compiled kernels from the on-disk cache, and give the same numbers on the same random draws; a
change of the program, of a Python hyperparameter or of a tensor constant's values must miss (a
stale hit would silently train another model). Each test uses its own empty cache folder.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal
from torch import Tensor

import pyro_elbo
from pyro_elbo.compile import inductor, torch_internals
from pyro_elbo.compile.progress import CompileProgress, phase, stream_show


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An empty inductor cache for the test (inductor reads the variable on every lookup).

    A cold inductor compile of even a small graph costs 10-25 s on two shared cores, so every
    test that compiles is slow but one: the default suite checks that a second compile of the
    same graph hits the cache (a path that stops caching fails it)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    yield


def _traced(fn: Callable[..., tuple[Tensor, ...]], inputs: list[Tensor]) -> torch.fx.GraphModule:
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(fn, tracing_mode="fake", _allow_non_fake_inputs=True)(*inputs)


def _step(scale: float, shift: Tensor) -> Callable[[Tensor, Tensor], tuple[Tensor, ...]]:
    """A small training-step-like function: a random draw, a hyperparameter and a tensor constant."""

    def step(w: Tensor, x: Tensor) -> tuple[Tensor, ...]:
        z = w + torch.randn_like(w)
        loss = (scale * (x @ z - shift) ** 2).sum()
        return loss, torch.isfinite(loss), 2 * scale * x.T @ (x @ z - shift)

    return step


def test_cache_lookups_see_a_shape_env() -> None:
    """Inductor's FX graph cache and AOTAutograd's cache bypass when the tracing context has no
    shape environment (``compile_fx`` called outside Dynamo): compile_graph must provide one."""
    from torch._inductor.codecache import FxGraphCache

    assert FxGraphCache._get_shape_env() is None
    with torch_internals.shape_env_context():
        assert FxGraphCache._get_shape_env() is not None
    assert FxGraphCache._get_shape_env() is None


def test_cpu_check_runs_once_beside_the_compile() -> None:
    """``start_cpu_check`` runs inductor's vector-ISA check in one background thread per process
    and leaves inductor's own cached answer behind, so the compile finds it instead of waiting on
    the probe's subprocesses."""
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    torch_internals.start_cpu_check()
    thread = torch_internals._cpu_check
    torch_internals.start_cpu_check()
    assert thread is not None and torch_internals._cpu_check is thread  # a second call starts nothing
    thread.join(timeout=300)
    assert not thread.is_alive()
    assert valid_vec_isa_list.cache_info().currsize == 1  # filled by the thread (an error leaves it empty)


def test_small_graphs_are_compiled_as_scalar_code() -> None:
    """Vector code pays only past SCALAR_CODE_MAX_ELEMENTS elements: a graph whose every tensor is
    at most that big compiles with ``cpp.simdlen = 1``; one larger tensor, anywhere in the graph,
    or a value without metadata, keeps the vector code."""
    limit = inductor.SCALAR_CODE_MAX_ELEMENTS
    small = [torch.randn(4), torch.randn(limit // 4, 4)]  # x @ z: the largest tensor is x itself
    graph = _traced(_step(2.0, torch.zeros(limit // 4)), small)
    assert inductor.largest_tensor(graph, small) == limit
    assert inductor.cpu_patches(graph, small) == {**inductor.CPU_PATCHES, "cpp.simdlen": 1}

    def outer(w: Tensor, x: Tensor) -> tuple[Tensor, ...]:  # inputs as small, an intermediate past the limit
        product = x[:, None, :] * x[None, :, :]
        return product.sum() * w.sum(), w

    graph = _traced(outer, small)
    assert inductor.largest_tensor(graph, small) == (limit // 4) ** 2 * 4
    assert "cpp.simdlen" not in inductor.cpu_patches(graph, small)

    graph = _traced(_step(2.0, torch.zeros(limit // 4)), small)
    next(n for n in graph.graph.nodes if n.op == "call_function").meta.pop("val")
    assert "cpp.simdlen" not in inductor.cpu_patches(graph, small)


def test_same_graph_hits_the_cache(cache_dir: None) -> None:
    w, x = torch.randn(3), torch.randn(5, 3)
    shift = torch.arange(5.0)
    first, _, stats = inductor.compile_graph(_traced(_step(0.5, shift), [w, x]), [w, x], "inductor")
    assert stats.cache == "miss", stats
    second, _, stats = inductor.compile_graph(_traced(_step(0.5, shift.clone()), [w, x]), [w, x], "inductor")
    assert stats.cache == "hit", stats
    torch.manual_seed(3)
    a = first(w, x)
    torch.manual_seed(3)
    b = second(w, x)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def _affine(scale: float, shift: Tensor) -> Callable[[Tensor, Tensor], tuple[Tensor, ...]]:
    def step(w: Tensor, x: Tensor) -> tuple[Tensor, ...]:
        residual = x @ w - shift
        return (scale * residual**2).sum(), residual

    return step


@pytest.mark.slow  # up to five inductor compiles: ~25 s on two cores
def test_changes_miss_or_read_the_new_constants(cache_dir: None) -> None:
    """A Python hyperparameter (a literal in the graph's code) and the input shapes are in the
    key: a change misses. A tensor constant's values are either in the key (inductor inlines
    small ones into the code) or read from the new graph when a hit is loaded: either way the
    compiled step must compute with the new values."""
    w, x = torch.randn(3), torch.randn(5, 3)
    outcomes = []
    for scale, shift, rows in [
        (0.5, torch.arange(5.0), 5),
        (0.25, torch.arange(5.0), 5),
        (0.5, torch.arange(5.0), 4),
        (0.5, torch.arange(5.0) + 1, 5),
        (0.5, torch.tensor(7.0), 5),
    ]:
        fn = _affine(scale, shift[:rows] if shift.dim() else shift)
        compiled, _, stats = inductor.compile_graph(_traced(fn, [w, x[:rows]]), [w, x[:rows]], "inductor")
        outcomes.append(stats.cache)
        for got, want in zip(compiled(w, x[:rows]), fn(w, x[:rows])):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (scale, shift, rows)  # float32 rounding
    assert outcomes[:3] == ["miss", "miss", "miss"], outcomes


def _schools(prior_scale: float) -> Callable[[Tensor, Tensor], None]:
    def model(y: Tensor, sigma: Tensor) -> None:
        mu = pyro.sample("mu", dist.Normal(0.0, prior_scale))
        tau = pyro.sample("tau", dist.HalfCauchy(5.0))
        with pyro.plate("school", len(y)):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
            pyro.sample("obs", dist.Normal(theta, sigma), obs=y)

    return model


def _fit_cache(prior_scale: float, seed: int = 0) -> tuple[str, list[float]]:
    y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
    sigma = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
    pyro.clear_param_store()
    model = _schools(prior_scale)
    result = pyro_elbo.fit(model, AutoNormal(model), y, sigma, num_steps=3, seed=seed, compile=True, progress=False)
    assert result.compile_stats is not None
    return result.compile_stats.cache, [float(v) for v in result.history]


@pytest.mark.slow  # three cold inductor compiles of a training step: ~50 s on two cores
def test_fit_reuses_kernels_only_for_the_same_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A warm cache gives the losses of a cold compile, for the same model and for a changed one."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "a"))
    cold, losses = _fit_cache(5.0)
    assert cold == "miss"
    warm, again = _fit_cache(5.0)
    assert warm == "hit" and again == losses  # same seed, same kernels: the same draws and losses
    _, changed = _fit_cache(6.0)  # a hit may only reuse code that reads the new prior scale
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "b"))
    fresh, reference = _fit_cache(6.0)
    assert fresh == "miss" and changed == reference and changed != losses


@pytest.mark.slow  # one cold inductor compile: ~15 s on two cores
def test_sizes_made_from_data_compile_directly(cache_dir: None) -> None:
    """A graph whose values have sizes made from data (``x[mask]``, unbacked symbols) compiles by
    inductor directly, in the fake mode it was traced in (in a new one the compile's retrace made
    symbols of the same names and refused them, and the step went through ``torch.compile``); the
    warning of that fallback would fail this test (warnings are errors)."""

    def masked(w: Tensor, x: Tensor) -> tuple[Tensor, ...]:
        kept = (x * w)[x > 0]
        return (kept.exp().sum() / kept.numel(),)

    w, x = torch.tensor(0.5), torch.tensor([0.3, -1.0, 2.0, -0.5, 1.0])
    compiled, _, stats = inductor.compile_graph(_traced(masked, [w, x]), [w, x], "inductor")
    assert stats.fallback == "", stats
    torch.testing.assert_close(compiled(w, x)[0], masked(w, x)[0])


def test_progress_line_names_each_phase() -> None:
    lines: list[tuple[str, bool]] = []
    with CompileProgress(show=lambda text, final: lines.append((text, final)), interval=0.01) as progress:
        with phase("trace"):
            pass
        with phase("inductor") as shown:
            shown.note = "cache hit"
        final = progress.finish()
        with phase("trace"):  # a later capture in the same run gets its own line
            pass
    assert final is not None and final.startswith("compiled the step in ")
    assert "trace" in final and "inductor" in final and "cache hit" in final
    assert lines[-1][1] and lines[-1][0].startswith("compiled the step in ") and "inductor" not in lines[-1][0]
    assert any(not f and t.startswith("compiling the step: trace") for t, f in lines)


def test_no_progress_unless_asked() -> None:
    with phase("trace") as shown:  # no CompileProgress: timed only
        pass
    assert shown.seconds is not None and shown.seconds >= 0


def test_stream_show_writes_only_final_lines_to_a_file() -> None:
    stream = io.StringIO()
    show = stream_show(stream)
    show("compiling the step: trace 0.1 s...", False)
    show("compiled the step in 0.1 s (trace 0.1 s)", True)
    show("", True)  # cleared: nothing on a file
    assert stream.getvalue() == "compiled the step in 0.1 s (trace 0.1 s)\n"


def test_a_failed_compile_clears_the_line() -> None:
    lines: list[tuple[str, bool]] = []
    with CompileProgress(show=lambda text, final: lines.append((text, final))) as progress:
        with phase("trace"):
            pass
        assert progress.finish(write=False) is None
    assert lines[-1] == ("", True) and not any(t.startswith("compiled") for t, _ in lines)
