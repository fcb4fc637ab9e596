"""Compiling a captured FX graph: inductor directly, ``torch.compile`` as the fallback.

Inductor's ``compile_fx`` on the graph skips Dynamo and its per-call guards (the graph was traced
once by :func:`~pyro_elbo._pyro.capture.trace_step`); on CUDA it runs the graph as CUDA graphs
(inductor's cudagraph trees, what ``mode="reduce-overhead"`` turns on): one launch per step
instead of one per kernel. ``compile_fx`` is a private API (reached through
:mod:`pyro_elbo.compile.torch_internals`), so any failure there falls back to the public
``torch.compile``, with one warning that says the on-disk caches are lost.

Persistent caches. Inductor keeps two caches on disk (``TORCHINDUCTOR_CACHE_DIR``, by default
``/tmp/torchinductor_$USER``): the FX graph cache (generated code and the compiled C++/Triton
kernels) and the AOTAutograd cache. Both are keyed by the graph itself: its code, the value of
every tensor constant in it, the input shapes, dtypes and strides, inductor's configuration and
the torch version. A second process that traces the same model with the same shapes reuses the
compiled kernels (seconds instead of tens of seconds); a different model, hyperparameter or
constant traces to a different graph and compiles afresh, so a cache hit can never run another
model's graph. Both caches look up guards in the shape environment of the current tracing context;
``compile_fx`` called outside Dynamo has none and bypasses them ("No shape env"), so
:func:`compile_graph` provides one (static shapes: no guards). Measurements behind the options
below are in ``benchmarks/README.md``.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pyro_elbo._pyro.capture_failures import user_stacklevel
from pyro_elbo.compile.progress import phase
from pyro_elbo.compile.torch_internals import (
    cache_counters,
    compile_fx,
    import_compile_fx,
    shape_env_context,
    start_cpu_check,
)

__all__ = [
    "CPU_PATCHES",
    "SCALAR_CODE_MAX_ELEMENTS",
    "CompileStats",
    "compile_graph",
    "cpu_patches",
    "prepare_compile_fx",
    "start_cpu_check",
    "warn_fallback_to_torch_compile",
]

#: inductor options for a captured training step on the CPU. ``cpp_wrapper``: the graph's wrapper
#: is C++ in the same file as its kernels, so the whole step is one C++ translation unit compiled
#: once, and a call runs no Python between kernels (shorter cold compiles and faster steps).
#: ``compile_threads=1``: with one file a pool of compile workers has nothing to share out, and
#: starting it (each worker imports torch) costs seconds. ``size_asserts=False``: the C++ wrapper
#: would check every input's sizes and strides on each call; safe to drop because
#: :class:`~pyro_elbo.compile.graph.CompiledLoss` keys its graphs by every input's shape and strides,
#: so an input of another layout gets a graph of its own.
CPU_PATCHES: dict[str, Any] = {"compile_threads": 1, "cpp_wrapper": True, "size_asserts": False}

#: a CPU graph whose largest tensor holds at most this many elements is generated as scalar C++
#: (inductor's ``cpp.simdlen = 1``; see :func:`cpu_patches`). Inductor writes each kernel twice
#: when it vectorizes (a vector loop and a scalar tail) and the vector code is slow to compile; on
#: short loops the vector loop barely runs, so scalar code compiles faster and runs as fast. Above
#: the threshold vectors pay.
SCALAR_CODE_MAX_ELEMENTS = 512


@dataclass
class CompileStats:
    """What one :func:`compile_graph` call did (it returns them; ``FitResult.compile_stats`` holds
    those of the training step's graph).

    Attributes:
        seconds: wall time of the call.
        cache: ``"hit"`` (kernels loaded from inductor's FX graph cache), ``"miss"`` (compiled and
            saved), ``"bypass"`` (not cacheable), or ``""`` (no inductor: eager or ``torch.compile``).
        counters: inductor's and AOTAutograd's cache counters during the call.
        fallback: why inductor's ``compile_fx`` failed, when the graph was compiled by
            ``torch.compile`` instead (without the on-disk caches: every process compiles again).
    """

    seconds: float = 0.0
    cache: str = ""
    counters: dict[str, int] = field(default_factory=dict)
    fallback: str = ""


def compile_graph(
    graph: torch.fx.GraphModule, inputs: list[Tensor], backend: str
) -> tuple[Callable[..., Any], bool, CompileStats]:
    """``graph`` compiled for ``inputs`` (real tensors) by ``backend``; whether it runs as CUDA
    graphs (then a caller must call ``torch.compiler.cudagraph_mark_step_begin()`` before each
    call and copy the outputs it keeps); and what the compile did.

    With ``backend="inductor"`` a second process that traces the same graph (same model, constants
    and input signature) loads the compiled kernels from inductor's on-disk caches instead of
    generating and compiling C++ again; see the module docstring for what the cache key covers.
    Any exception on that path (a private API) compiles the graph with ``torch.compile`` instead,
    with one ``RuntimeWarning`` naming the error and what is lost."""
    if backend == "eager":
        return graph, False, CompileStats()
    start = time.perf_counter()
    failure = ""
    if backend == "inductor":
        cuda = all(t.device.type == "cuda" for t in inputs)
        try:
            with phase("inductor") as shown:
                cpu = all(t.device.type == "cpu" for t in inputs)
                if cpu:
                    start_cpu_check()
                patches: dict[str, Any] = (
                    {"triton.cudagraphs": True} if cuda else cpu_patches(graph, inputs) if cpu else {}
                )
                prepare_compile_fx()
                with cache_counters() as counts, shape_env_context(graph), _quiet_fallback_notes():
                    compiled = compile_fx(graph, inputs, patches)
                stats = CompileStats(time.perf_counter() - start, _cache_outcome(counts), counts)
                shown.note = f"cache {stats.cache}" if stats.cache else ""
            return compiled, cuda, stats
        except Exception as error:  # a private API: fall back to the public entry point
            failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            warn_fallback_to_torch_compile(failure)
    compiled = torch.compile(graph, backend=backend, dynamic=False)
    return compiled, False, CompileStats(time.perf_counter() - start, fallback=failure)


def warn_fallback_to_torch_compile(failure: str) -> None:
    """The one warning for a graph that inductor's direct compile refused (``failure``)."""
    warnings.warn(
        f"compile=True: inductor's direct compile failed ({failure}); the step is compiled by "
        "torch.compile instead, without inductor's on-disk caches (every process compiles it again)",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )


def prepare_compile_fx() -> None:
    """Import what :func:`compile_graph` runs, with the deprecation warnings torch's own modules
    raise on import silenced (APIs torch itself deprecated: nothing a user can act on). Imports
    happen once. Any failure is left for the compile to meet."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script_method.*", category=DeprecationWarning)
        try:
            import_compile_fx()
        except Exception:  # compile_graph meets it again and falls back
            pass


def cpu_patches(graph: torch.fx.GraphModule, inputs: list[Tensor]) -> dict[str, Any]:
    """Inductor's options for compiling ``graph`` on the CPU: :data:`CPU_PATCHES`, and scalar code
    (``cpp.simdlen = 1``) when no tensor of the graph (its inputs, and every intermediate value
    traced with fake-tensor metadata) holds more than :data:`SCALAR_CODE_MAX_ELEMENTS` elements."""
    patches = dict(CPU_PATCHES)
    if largest_tensor(graph, inputs) <= SCALAR_CODE_MAX_ELEMENTS:
        patches["cpp.simdlen"] = 1
    return patches


def largest_tensor(graph: torch.fx.GraphModule, inputs: list[Tensor]) -> int:
    """The most elements any input of ``graph`` or any value it computes holds (values without
    metadata count as unbounded, so a graph with one is vectorized)."""
    largest = max((t.numel() for t in inputs), default=0)
    for node in graph.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "get_attr":  # a tensor constant
            values = getattr(graph, str(node.target), None)
        elif "val" in node.meta:
            values = node.meta["val"]
        else:
            return 2**62
        for value in values if isinstance(values, (list, tuple)) else (values,):
            if isinstance(value, Tensor):
                largest = max(largest, value.numel())
    return largest


class _DropFallbackNotes(logging.Filter):
    """Inductor logs a warning for each random operation without a C++ shim (``_standard_gamma``,
    ``_sample_dirichlet`` and their gradients: gamma, beta, Dirichlet sites) and runs it through
    its proxy executor, which works: a note for inductor's developers, not for a user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "missing a c-shim implementation" not in record.getMessage()


@contextlib.contextmanager
def _quiet_fallback_notes() -> Iterator[None]:
    logger, note_filter = logging.getLogger("torch._inductor.ir"), _DropFallbackNotes()
    logger.addFilter(note_filter)
    try:
        yield
    finally:
        logger.removeFilter(note_filter)


def _cache_outcome(counts: dict[str, int]) -> str:
    """The FX graph cache's answer: it holds the generated code and compiled kernels, the
    expensive part (AOTAutograd's cache, in front of it, may bypass on a graph it cannot pickle)."""
    for outcome in ("bypass", "miss", "hit"):
        if counts.get(f"fxgraph_cache_{outcome}"):
            return outcome
    return ""
