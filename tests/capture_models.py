"""Programs whose training step cannot be captured for a known reason, shared by the capture tests
(``test_capture.py``) and the fallback tests of torch's internals (``test_torch_internals.py``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

import pyro_elbo


def _in_a_package_file(source: str, name: str) -> Callable[..., Any]:
    """The function ``name`` that ``source`` defines, compiled under a file name of the package so
    that its frames are the package's (the failure descriptions never blame a package frame)."""
    namespace: dict[str, Any] = {}
    path = os.path.join(os.path.dirname(pyro_elbo.__file__), "_pyro", "checks.py")
    exec(compile(source, path, "exec"), namespace)
    return namespace[name]  # type: ignore[no-any-return]


#: stands for a check of the package that compares two sizes (a guard on them while capturing)
package_check = _in_a_package_file(
    "def package_check(a, b):\n    return a.sum() + b.sum() if a.shape == b.shape else a.sum()\n", "package_check"
)


def masked_sizes_compared_in_the_package() -> tuple[Any, Any, tuple[Any, ...]]:
    """Two sizes made from data (``x[mask]``) in the model, first compared in package code."""

    def model(x: Tensor) -> None:
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        kept = x[x != -1]
        shifted = (z + x)[x > 0]
        pyro.factor("both", package_check(kept, shifted))

    def guide(x: Tensor) -> None:
        pyro.sample("z", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

    return model, guide, (torch.tensor([0.5, -1.0, 1.5, -1.0, 0.2]),)
