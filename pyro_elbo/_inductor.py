"""Compiling a captured FX graph: inductor directly, ``torch.compile`` as the fallback.

Inductor's ``compile_fx`` on the graph skips Dynamo and its per-call guards (the graph was traced
once by :func:`~pyro_elbo._pyro.capture.trace_step`); on CUDA it runs the graph as CUDA graphs
(inductor's cudagraph trees, what ``mode="reduce-overhead"`` turns on): one launch per step
instead of one per kernel. ``compile_fx`` is a private API, so any failure there falls back to
the public ``torch.compile``.

Persistent caches. Inductor keeps two caches on disk (``TORCHINDUCTOR_CACHE_DIR``, by default
``/tmp/torchinductor_$USER``): the FX graph cache (generated code and the compiled C++/Triton
kernels) and the AOTAutograd cache. Both are keyed by the graph itself: its code, the value of
every tensor constant in it, the input shapes, dtypes and strides, inductor's configuration and
the torch version. A second process that traces the same model with the same shapes reuses the
compiled kernels (seconds instead of tens of seconds); a different model, hyperparameter or
constant traces to a different graph and compiles afresh, so a cache hit can never run another
model's graph. Both caches look up guards in the shape environment of the current tracing context;
``compile_fx`` called outside Dynamo has none and bypasses them ("No shape env"), so
:func:`compile_graph` provides one (static shapes: no guards).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pyro_elbo._compile_progress import phase

#: inductor options for a captured training step on the CPU. ``cpp_wrapper``: the graph's wrapper
#: is C++ in the same file as its kernels, so the whole step is one C++ translation unit compiled
#: once (with the Python wrapper, sparse gamma DEF compiled 16 shared libraries, each parsing the same
#: headers), and a call runs no Python between kernels. Measured side by side on the 2-core
#: machine (baseball logit, load ~3.5): cold compile 21 s instead of 29 s, a second process 5.4 s
#: instead of 6.1 s, 63 µs per step instead of 115 µs. ``compile_threads=1``: with one file a pool
#: of compile workers has nothing to share out, and starting it (each worker imports torch) costs
#: seconds. ``size_asserts=False``: the C++ wrapper checks every input's sizes and strides on each
#: call (``assert_size_stride``, a ``std::stringstream`` built per input even when the check
#: passes); off, eight schools' graph call took 28 µs instead of 37 µs (logistic regression 123 vs
#: 127 µs), side by side. Safe because :class:`~pyro_elbo.compiled.CompiledLoss` keys its graphs
#: by every input's shape and strides, so an input of another layout gets a graph of its own.
CPU_PATCHES: dict[str, Any] = {"compile_threads": 1, "cpp_wrapper": True, "size_asserts": False}

#: a CPU graph whose largest tensor holds at most this many elements is generated as scalar C++
#: (inductor's ``cpp.simdlen = 1``; see :func:`cpu_patches`). Inductor writes each kernel twice
#: when it vectorizes (a vector loop and a scalar tail) and the vector code is slow to compile; on
#: short loops the vector loop barely runs. Measured on the 2-core AMD EPYC (AVX2, one thread,
#: 2026-11-27; step time alternated between the two builds in one process, 7 rounds, fastest
#: round): sparse GP (largest tensor 180 elements) cold compile 12 s instead of 38 s, step 228 vs
#: 228 µs; LDA amortized (480) 3.8 vs 7.0 s, 306 vs 315 µs; eight schools (20), baseball (40),
#: the Gaussian mixture (40) and HMM (192) enumerated: compile 10-45% shorter, steps as fast or
#: faster. Above it vectors pay: AutoIAFNormal (1,032) 147 vs 116 µs, sparse gamma DEF (2,048) 637
#: vs 546 µs, the VAE (8,192) and BNAF (16,680) ~2.4x slower scalar.
SCALAR_CODE_MAX_ELEMENTS = 512


@dataclass
class CompileStats:
    """What the last :func:`compile_graph` call did (read by benchmarks and tests).

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


#: the statistics of the most recent :func:`compile_graph` call in this process
last_stats = CompileStats()


def compile_graph(graph: torch.fx.GraphModule, inputs: list[Tensor], backend: str) -> tuple[Callable[..., Any], bool]:
    """``graph`` compiled for ``inputs`` (real tensors) by ``backend``; and whether it runs as
    CUDA graphs (then a caller must call ``torch.compiler.cudagraph_mark_step_begin()`` before each
    call and copy the outputs it keeps).

    With ``backend="inductor"`` a second process that traces the same graph (same model, constants
    and input signature) loads the compiled kernels from inductor's on-disk caches instead of
    generating and compiling C++ again; see the module docstring for what the cache key covers."""
    global last_stats
    last_stats = CompileStats()
    if backend == "eager":
        return graph, False
    start = time.perf_counter()
    failure = ""
    if backend == "inductor":
        cuda = all(t.device.type == "cuda" for t in inputs)
        try:
            with phase("inductor") as shown:
                cpu = all(t.device.type == "cpu" for t in inputs)
                with warnings.catch_warnings():  # torch's own modules use APIs torch deprecated: not actionable
                    warnings.filterwarnings(
                        "ignore", message=".*torch.jit.script_method.*", category=DeprecationWarning
                    )
                    if cpu:
                        start_cpu_check()
                    from torch._inductor.compile_fx import compile_fx

                patches: dict[str, Any] = (
                    {"triton.cudagraphs": True} if cuda else cpu_patches(graph, inputs) if cpu else {}
                )
                with _cache_counters() as counts, _shape_env_context(), _quiet_fallback_notes():
                    compiled: Callable[..., Any] = compile_fx(graph, inputs, config_patches=patches)  # type: ignore[assignment]
                last_stats = CompileStats(time.perf_counter() - start, _cache_outcome(counts), counts)
                shown.note = f"cache {last_stats.cache}" if last_stats.cache else ""
            return compiled, cuda
        except Exception as error:  # a private API: fall back to the public entry point
            failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    compiled = torch.compile(graph, backend=backend, dynamic=False)
    last_stats = CompileStats(time.perf_counter() - start, fallback=failure)
    return compiled, False


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


#: the thread running :func:`start_cpu_check` (once per process)
_cpu_check: threading.Thread | None = None


def start_cpu_check() -> None:
    """Start inductor's check of the CPU's vector instructions in a background thread (once per
    process; a no-op after the first call).

    Before it generates C++ for the CPU, inductor picks the widest vector ISA (AVX-512, AVX2...)
    that the compiler builds and the machine loads: it compiles a small probe into its cache folder
    (seconds with a fresh cache) and loads it in a child Python (~0.5 s, in every process). That
    check waits on subprocesses, not on the interpreter, so it runs beside the trace and inductor's
    own Python work instead of before the code generation. It is inductor's own function, cached for
    the process: the graph compiles with the ISA it finds, as it would without the thread.

    Thread safety: every module the check imports is imported here, in the calling thread, before
    the thread starts (imports of one package racing in two threads can meet half-initialised
    modules); what the thread then does is run subprocesses and fill ``functools.cache`` entries.
    If the compile needs the ISA before the thread has finished, inductor runs the check again
    itself (a duplicate, waiting on inductor's file lock; the answer is the same). An error in the
    thread is dropped: inductor's own call then meets it and falls back as it always would."""
    global _cpu_check
    if _cpu_check is not None:
        return
    import torch._inductor.codecache  # noqa: F401  (the check's compile: codecache, cpp_builder, file lock)
    import torch.utils.cpp_extension  # noqa: F401  (the check's include paths; imports setuptools)
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    def check() -> None:
        try:
            pick_vec_isa()
        except Exception:  # inductor's own call meets it again, in the compiling thread
            pass

    _cpu_check = threading.Thread(target=check, name="pyro_elbo inductor CPU check", daemon=True)
    _cpu_check.start()
    # the hash of torch's sources in every cache key (~0.3 s of file reads and sha256 per process):
    # inductor's own background computation for it (thread-safe: a lock, then a future)
    prefetch = getattr(torch._inductor.codecache.torch_key, "prefetch", None)
    if prefetch is not None:
        prefetch()


@contextlib.contextmanager
def _shape_env_context() -> Iterator[None]:
    """A tracing context whose fake mode has a shape environment, so that inductor's FX graph
    cache and AOTAutograd's cache are used (without one both bypass). The graph has static shapes:
    the environment records no guards, and every cache entry is one exact input signature."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    if torch._guards.TracingContext.try_get() is not None:  # inside someone's compile: theirs
        yield
        return
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
    with torch._guards.tracing(torch._guards.TracingContext(mode)):
        yield


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


_COUNTERS = (
    ("inductor", "fxgraph_cache_hit"),
    ("inductor", "fxgraph_cache_miss"),
    ("inductor", "fxgraph_cache_bypass"),
    ("aot_autograd", "autograd_cache_hit"),
    ("aot_autograd", "autograd_cache_miss"),
    ("aot_autograd", "autograd_cache_bypass"),
)


@contextlib.contextmanager
def _cache_counters() -> Iterator[dict[str, int]]:
    """The change of inductor's cache counters during the block (filled in on exit)."""
    from torch._dynamo.utils import counters

    before = {name: counters[group][name] for group, name in _COUNTERS}
    changes: dict[str, int] = {}
    try:
        yield changes
    finally:
        for group, name in _COUNTERS:
            change = counters[group][name] - before[name]
            if change:
                changes[name] = change


def _cache_outcome(counts: dict[str, int]) -> str:
    """The FX graph cache's answer: it holds the generated code and compiled kernels, the
    expensive part (AOTAutograd's cache, in front of it, may bypass on a graph it cannot pickle)."""
    for outcome in ("bypass", "miss", "hit"):
        if counts.get(f"fxgraph_cache_{outcome}"):
            return outcome
    return ""
