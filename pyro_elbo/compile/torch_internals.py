"""Every use of torch's private modules, in one place.

The compiled path needs a few things torch offers only through private modules: inductor's
``compile_fx`` (a graph compiled without Dynamo's per-call guards, and with inductor's on-disk
caches), a fake-mode tracing context with a shape environment (without one those caches bypass),
inductor's cache counters, its CPU vector-ISA check, ``make_fx`` with real tensors allowed beside
fake ones, and fake-tensor metadata for graph rewrites. A torch release may move or change any of
them, and counting the operators a step dispatches (a Python dispatch mode) estimates what a
compile will cost. This module is the only one in the package that imports ``torch._inductor``,
``torch._dynamo``, ``torch._guards``, ``torch._subclasses``, ``torch._prims``, ``torch._functorch``,
``torch.fx.experimental`` or ``torch.utils._python_dispatch`` (``tests/test_architecture.py`` checks it), so an upgrade that breaks
one shows up here, and each caller says what it does when a function here raises:

================================  ===========================================================================
function                          a failure (any exception) degrades to
================================  ===========================================================================
:func:`compile_fx`                ``torch.compile`` (the graph compiles; inductor's on-disk caches are lost)
:func:`import_compile_fx`         ``torch.compile``, as :func:`compile_fx` (which meets the error again)
:func:`shape_env_context`         ``torch.compile``, as :func:`compile_fx`
:func:`cache_counters`            ``torch.compile``, as :func:`compile_fx`
:func:`start_cpu_check`           nothing: the check is a head start; inductor runs it itself when compiling
:func:`trace_fake`                the eager step (the model/guide cannot be captured)
:func:`is_fake`,
:func:`fake_mode_of`              the graph compiles without the rewrite that needed them
:func:`is_data_dependent`         a failed capture described without naming a data-dependent guard
:func:`data_dependent_origins`    a failed capture described at the line where the guard failed
:func:`counting_operators`        no count: ``compile="auto"`` expects a compile of a typical size
================================  ===========================================================================
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor


def import_compile_fx() -> None:
    """Import inductor's ``compile_fx`` module (and what it imports) without compiling anything."""
    import torch._inductor.compile_fx  # noqa: F401


def compile_fx(graph: torch.fx.GraphModule, inputs: list[Tensor], config_patches: dict[str, Any]) -> Callable[..., Any]:
    """``graph`` compiled by inductor for ``inputs`` with ``config_patches``, without Dynamo."""
    from torch._inductor.compile_fx import compile_fx as inductor_compile_fx

    compiled: Callable[..., Any] = inductor_compile_fx(graph, inputs, config_patches=config_patches)  # type: ignore[assignment]
    return compiled


@contextlib.contextmanager
def shape_env_context(graph: torch.fx.GraphModule | None = None) -> Iterator[None]:
    """A tracing context whose fake mode has a shape environment, so that inductor's FX graph
    cache and AOTAutograd's cache are used (without one both bypass: "No shape env"). The graph has
    static shapes: the environment records no guards, and every cache entry is one exact input
    signature. A ``graph`` whose values have sizes made from data (``x[mask]``: unbacked symbols)
    is compiled in the fake mode it was traced in, whose shape environment knows those symbols
    (in a new one, the compile's retrace makes symbols of the same names and refuses them). Inside
    someone else's compile (a tracing context already set), theirs is kept."""
    import torch._guards
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv, free_unbacked_symbols

    if torch._guards.TracingContext.try_get() is not None:
        yield
        return
    values = [] if graph is None else [node.meta.get("val") for node in graph.graph.nodes]
    traced = None
    if any(free_unbacked_symbols(value) for value in values if value is not None):
        traced = torch._guards.detect_fake_mode([v for v in values if isinstance(v, Tensor)])
    mode = traced if traced is not None else FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
    with torch._guards.tracing(torch._guards.TracingContext(mode)):
        yield


#: inductor's and AOTAutograd's cache counters, ``(group, name)``
CACHE_COUNTERS = (
    ("inductor", "fxgraph_cache_hit"),
    ("inductor", "fxgraph_cache_miss"),
    ("inductor", "fxgraph_cache_bypass"),
    ("aot_autograd", "autograd_cache_hit"),
    ("aot_autograd", "autograd_cache_miss"),
    ("aot_autograd", "autograd_cache_bypass"),
)


@contextlib.contextmanager
def cache_counters() -> Iterator[dict[str, int]]:
    """The change of inductor's cache counters (:data:`CACHE_COUNTERS`) during the block, filled in
    on exit; only the counters that changed are present."""
    from torch._dynamo.utils import counters

    before = {name: counters[group][name] for group, name in CACHE_COUNTERS}
    changes: dict[str, int] = {}
    try:
        yield changes
    finally:
        for group, name in CACHE_COUNTERS:
            change = counters[group][name] - before[name]
            if change:
                changes[name] = change


#: the thread running :func:`start_cpu_check` (once per process)
_cpu_check: threading.Thread | None = None


def start_cpu_check() -> None:
    """Start inductor's check of the CPU's vector instructions in a background thread (once per
    process; a no-op after the first call, and a no-op when torch's modules for it are missing or
    fail: inductor then meets the problem itself when it compiles, and the caller falls back).

    Before it generates C++ for the CPU, inductor picks the widest vector ISA (AVX-512, AVX2...)
    that the compiler builds and the machine loads: it compiles a small probe into its cache folder
    and loads it in a child Python, in every process. That check waits on subprocesses, not on the
    interpreter, so it runs beside the trace and inductor's own Python work instead of before the
    code generation. It is inductor's own function, cached for the process: the graph compiles with
    the ISA it finds, as it would without the thread.

    Thread safety: every module the check imports is imported here, in the calling thread, before
    the thread starts (imports of one package racing in two threads can meet half-initialised
    modules); what the thread then does is run subprocesses and fill ``functools.cache`` entries.
    If the compile needs the ISA before the thread has finished, inductor runs the check again
    itself (a duplicate, waiting on inductor's file lock; the answer is the same)."""
    global _cpu_check
    if _cpu_check is not None:
        return
    try:
        import torch._inductor.codecache
        import torch.utils.cpp_extension  # noqa: F401  (the check's include paths; imports setuptools)
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        prefetch = getattr(torch._inductor.codecache.torch_key, "prefetch", None)
    except Exception:  # a head start only: inductor's own call meets the problem and the caller falls back
        return

    def check() -> None:
        try:
            pick_vec_isa()
        except Exception:  # inductor's own call meets it again, in the compiling thread
            pass

    _cpu_check = threading.Thread(target=check, name="pyro_elbo inductor CPU check", daemon=True)
    _cpu_check.start()
    # the hash of torch's sources in every cache key (file reads and sha256, once per process):
    # inductor's own background computation for it (thread-safe: a lock, then a future)
    if prefetch is not None:
        try:
            prefetch()
        except Exception:  # inductor computes it itself when it needs it
            pass


def trace_fake(step: Callable[..., Any], example: list[Tensor]) -> torch.fx.GraphModule:
    """``step`` traced by ``make_fx`` on fake copies of ``example`` (shapes, dtypes, devices);
    real tensors the step creates or closes over (data, constants) are allowed beside the fakes."""
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(step, tracing_mode="fake", _allow_non_fake_inputs=True)(*example)


def inside_make_fx() -> bool:
    """Whether the code runs inside a ``make_fx`` trace (a proxy mode is active); ``False`` when
    torch no longer has the function, which leaves the caller on its eager behaviour."""
    try:
        from torch.fx.experimental.proxy_tensor import get_proxy_mode
    except Exception:
        return False
    return get_proxy_mode() is not None


def is_data_dependent(error: BaseException) -> bool:
    """Whether ``error`` is torch's refusal to guard on a data-dependent value (``if tensor``,
    ``int(tensor)``, a size read from data); ``False`` when torch no longer has that class."""
    try:
        from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
    except Exception:
        return False
    return isinstance(error, GuardOnDataDependentSymNode)


def data_dependent_origins(error: BaseException) -> list[list[tuple[str, int, str]]]:
    """Where the data-dependent sizes that a refused guard (``error``: :func:`is_data_dependent`)
    asked about were made: for each of its unbacked symbols, the stack (``(file, line, function)``,
    outermost first) at the operation that created it (``x[mask]``, ``nonzero``). The guard itself
    may fail far from there (a shape check after the model returned). The shape environment that
    holds these stacks is read from the traceback of the refusal (its methods raised it). ``[]``
    when nothing is found, or torch's classes have moved or changed."""
    try:
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        env = None
        tb = error.__traceback__
        while tb is not None and env is None:
            env = next((v for v in tb.tb_frame.f_locals.values() if isinstance(v, ShapeEnv)), None)
            tb = tb.tb_next
        cond = getattr(error, "cond", None)  # GuardOnDataDependentSymNode's expression
        if env is None or cond is None:
            return []
        stacks = (env.var_to_stack.get(symbol) for symbol in sorted(cond.free_symbols, key=str))
        return [[(f.filename, f.lineno or 0, f.name) for f in stack.summary()] for stack in stacks if stack is not None]
    except Exception:  # the description then names the line where the guard failed
        return []


def is_fake(value: Any) -> bool:
    """Whether ``value`` is a fake tensor (metadata only, no storage)."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(value, FakeTensor)


def fake_mode_of(values: list[Tensor]) -> Any:
    """The fake mode of the fake tensors among ``values`` (``None`` if there are none); its
    ``from_tensor`` makes fake metadata for a new constant, and inside ``with mode:`` an operation
    on fake values gives the fake value of its result."""
    import torch._guards

    return torch._guards.detect_fake_mode(values)


class OperatorCount:
    """How many of torch's operators (ATen calls, forward and backward) ran inside
    :func:`counting_operators`; ``None`` when they could not be counted."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count: int | None = None


@contextlib.contextmanager
def counting_operators() -> Iterator[OperatorCount]:
    """Count the operators dispatched inside the block (a Python dispatch mode that passes each
    call through unchanged). The count of one training step predicts the size of its captured
    graph, and so the time inductor needs to compile it. If the mode cannot be entered (a torch
    release that moved it), the block runs without it and the count stays ``None``."""
    result = OperatorCount()
    try:
        from torch.utils._python_dispatch import TorchDispatchMode

        class _Counter(TorchDispatchMode):
            calls = 0

            def __torch_dispatch__(
                self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
            ) -> Any:
                self.calls += 1
                return func(*args, **(kwargs or {}))

        counter: Any = _Counter  # an untyped class of torch's
        mode = counter()
        mode.__enter__()
    except Exception:
        yield result
        return
    try:
        yield result
    finally:
        mode.__exit__(None, None, None)
        result.count = mode.calls
