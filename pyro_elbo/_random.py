"""Random state: forking it for side computations and capturing it for checkpoints and replays.

A run depends on torch's (and CUDA's) generator, Python's ``random`` and NumPy's legacy global
generator (Pyro seeds all of them in ``pyro.set_rng_seed``).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


@contextlib.contextmanager
def forked_rng() -> Iterator[None]:
    """Run a side computation (a guess, a diagnostic, a validation pass) without moving the
    caller's torch and CUDA random streams: a seeded run draws the same with or without it."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield


def torch_rng_state() -> dict[str, Any]:
    """The torch (and CUDA) random state only: cheap enough to take every step."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if cuda else []}


def set_torch_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`torch_rng_state` (a state loaded onto a GPU is moved back to the CPU)."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def rng_state() -> dict[str, Any]:
    """Every random state a run depends on: torch, CUDA, Python and NumPy (for checkpoints)."""
    np_state: tuple[Any, ...] = tuple(np.random.get_state(legacy=True))
    return {
        **torch_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    set_torch_rng_state(state)
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.cpu().numpy().astype(np.uint32), *rest))
