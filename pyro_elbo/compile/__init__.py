"""The compiled path: one training step captured as one graph and compiled.

The rooms, bottom up:

- :mod:`~pyro_elbo.compile.torch_internals`: every use of torch's private modules (the only
  module of the package that imports them); each caller degrades on any exception (inductor
  direct → ``torch.compile`` → eager) with one warning that says what was lost.
- :mod:`~pyro_elbo.compile.progress`: one line of progress while a step compiles.
- :mod:`~pyro_elbo.compile.rewrites`: FX passes on the captured graph before inductor sees it.
- :mod:`~pyro_elbo.compile.inductor`: compiling a captured graph (inductor, ``torch.compile``).
- :mod:`~pyro_elbo.compile.adam`: the in-graph Adam update and non-finite ledger.
- :mod:`~pyro_elbo.compile.graph`: :class:`CompiledLoss`, a step captured (through
  :mod:`pyro_elbo._pyro.capture`), rewritten and compiled, one graph per input signature.
- :mod:`~pyro_elbo.compile.flat`: :class:`FlatAdam`, the flat parameter and moment buffers.
- :mod:`~pyro_elbo.compile.svi`: :class:`SVICompiledSteps`, compiled ``loss_and_grads`` for
  ``pyro.infer.SVI``.

The names below are what the rest of the package imports. They are loaded on first use, so that
:mod:`pyro_elbo._pyro` (a lower layer) can import :mod:`~pyro_elbo.compile.torch_internals`
without importing the rooms above it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyro_elbo.compile.adam import adam_step, all_finite, plain_adam
    from pyro_elbo.compile.flat import FlatAdam
    from pyro_elbo.compile.graph import CompiledLoss
    from pyro_elbo.compile.progress import CompileProgress
    from pyro_elbo.compile.svi import SVICompiledSteps

#: each exported name and the room that defines it
_ROOMS = {
    "CompiledLoss": "graph",
    "SVICompiledSteps": "svi",
    "FlatAdam": "flat",
    "CompileProgress": "progress",
    "adam_step": "adam",
    "all_finite": "adam",
    "plain_adam": "adam",
}

__all__ = ["CompileProgress", "CompiledLoss", "FlatAdam", "SVICompiledSteps", "adam_step", "all_finite", "plain_adam"]


def __getattr__(name: str) -> object:
    room = _ROOMS.get(name)
    if room is None:
        raise AttributeError(f"module 'pyro_elbo.compile' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pyro_elbo.compile.{room}"), name)
