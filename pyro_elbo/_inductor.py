"""Compiling a captured FX graph: inductor directly, ``torch.compile`` as the fallback.

Inductor's ``compile_fx`` on the graph skips Dynamo and its per-call guards (the graph was traced
once by :func:`~pyro_elbo._pyro.capture.trace_step`); on CUDA it runs the graph as CUDA graphs
(inductor's cudagraph trees, what ``mode="reduce-overhead"`` turns on): one launch per step
instead of one per kernel. ``compile_fx`` is a private API, so any failure there falls back to
the public ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def compile_graph(graph: torch.fx.GraphModule, inputs: list[Tensor], backend: str) -> tuple[Callable[..., Any], bool]:
    """``graph`` compiled for ``inputs`` (real tensors) by ``backend``; and whether it runs as
    CUDA graphs (then a caller must call ``torch.compiler.cudagraph_mark_step_begin()`` before each
    call and copy the outputs it keeps)."""
    if backend == "eager":
        return graph, False
    if backend == "inductor":
        cuda = all(t.device.type == "cuda" for t in inputs)
        try:
            from torch._inductor.compile_fx import compile_fx

            patches = {"triton.cudagraphs": True} if cuda else {}
            compiled: Callable[..., Any] = compile_fx(graph, inputs, config_patches=patches)  # type: ignore[assignment]
            return compiled, cuda
        except Exception:  # a private API: fall back to the public entry point
            pass
    return torch.compile(graph, backend=backend, dynamic=False), False
