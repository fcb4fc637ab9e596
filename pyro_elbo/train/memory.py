"""Fail fast on particle counts that cannot fit: measure the memory a particle costs, before the
first step, instead of failing late in the allocator (or running for hours).

The tensors autograd saves for the backward pass grow linearly with the number of particles
:math:`S`: :math:`M(S) = a + bS`. Measuring :math:`M` at two small counts :math:`k` and
:math:`2k` gives :math:`b = M(2k) - M(k)` and :math:`a = M(k) - kb`, so the step needs at least
:math:`a + bS` bytes (a lower bound: forward temporaries, gradients and optimizer state come on
top). A run is refused only when that lower bound exceeds the memory available, so the check has
no false alarms.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import Tensor

from pyro_elbo._random import forked_rng
from pyro_elbo._typing import Guide, Model
from pyro_elbo.objectives import Objective

#: below this many particles the check is skipped (two small extra forward passes otherwise)
MIN_PARTICLES_CHECKED = 64


def saved_bytes(objective: Objective, model: Model, guide: Guide, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """Bytes of the distinct storages autograd saves for the backward pass of one loss
    evaluation (forked random stream; the objective's own state is not touched)."""
    storages: dict[tuple[str, int], int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        storages[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
        return tensor

    with forked_rng(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        objective.differentiable_loss(model, guide, *args, **kwargs)
    return sum(storages.values())


def available_bytes(device: torch.device | None) -> int | None:
    """Free memory on ``device`` (CUDA: the allocator's view; CPU: ``MemAvailable``), or ``None``."""
    if device is not None and device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device is not None and device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_particle_memory(
    objective: Objective,
    model: Model,
    guide: Guide,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    device: torch.device | None,
) -> None:
    """Raise before training if ``objective.num_particles`` particles cannot fit in memory.

    Raises:
        ValueError: naming the objective's ``num_particles``, the measured bytes per particle,
            the lower bound for the step and the memory available.
    """
    num_particles = int(objective.num_particles)
    if num_particles < MIN_PARTICLES_CHECKED:
        return
    k = max(1, int(objective.spec.min_particles))
    small = copy.copy(objective)  # the same program cache; its own baseline and particle count
    small.num_particles = k
    at_k = saved_bytes(small, model, guide, args, kwargs)
    small.num_particles = 2 * k
    per_particle = max(saved_bytes(small, model, guide, args, kwargs) - at_k, 0)
    needed = at_k + per_particle * (num_particles - k)
    free = available_bytes(device if device is not None else _data_device(args))
    if free is None or needed <= free:
        return
    raise ValueError(
        f"{objective!r}: num_particles={num_particles} needs at least {_size(needed)} for one step "
        f"({_size(per_particle)} per particle, measured on {k} and {2 * k} particles) but "
        f"{_size(free)} are available{'' if device is None else f' on {device}'}. Lower num_particles "
        f"(e.g. to {max(k, int(free // max(per_particle, 1) // 2))} or fewer)."
    )


def _data_device(args: tuple[Any, ...]) -> torch.device | None:
    tensors = [a for a in args if isinstance(a, Tensor)]
    return tensors[0].device if tensors else None


def _size(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num_bytes) < 1024 or unit == "TiB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1024
    return f"{num_bytes:.1f} PiB"
