"""Flat buffers for the compiled Adam step: all parameters in one vector, all moments in two.

The compiled step's cost on small models is not its kernels but the Python and allocations
around them: with one graph input and three outputs per parameter (value, first and second
moment), every step allocates and checks ``3n`` output buffers and writes ``3n`` tensors back.
:class:`FlatAdam` lays the parameters out one after another in a single vector
:math:`\\theta \\in \\mathbb{R}^{D}` (:math:`D = \\sum_i |\\theta_i|`) and makes each
parameter's ``.data`` a view of it, and likewise each ``exp_avg``/``exp_avg_sq`` of the
optimizer's state a view of a flat :math:`m, v \\in \\mathbb{R}^{D}`. The graph
(:meth:`~pyro_elbo.compile.graph.CompiledLoss.flat_adam`) then takes four vectors and the non-finite
ledger (:func:`~pyro_elbo.compile.adam.guarded_step`) and writes them in place (on CUDA it returns them
and one ``_foreach_copy_`` writes the step).

The parameters stay the same tensor objects (param store, modules, ``state_dict`` and
checkpoints see them unchanged) and the optimizer state stays ``torch.optim.Adam``'s own dict,
so an eager step, a checkpoint or a resume work as before. Whatever replaces a parameter's
storage or the optimizer's state (``load_state_dict``, ``p.data = ...``) is noticed on the next
step, which lays the buffers out again from the current values. A tensor that aliased a
parameter's memory before its first compiled step (``w = param.detach()`` taken earlier) no longer
follows it afterwards; read parameters through the parameter (or ``state.params``).

While laid out, a parameter is a view of the shared vector, and ``torch.save`` writes a view's
whole storage: :func:`~pyro_elbo.fit` therefore gives each parameter its own memory again when it
returns (:meth:`FlatAdam.release`, through ``TrainState.release_flat_buffers``); a loop of your
own calls ``state.release_flat_buffers()`` before saving single modules.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pyro_elbo.compile.adam import LEDGER_FIELDS, AdamBuffers, AdamScalars, Layout, adam_scalars
from pyro_elbo.compile.graph import CompiledLoss

#: the ledger entries a handled halt clears: its run of non-finite steps and the halting call
_RESET_ON_HALT = [LEDGER_FIELDS.index("consecutive"), LEDGER_FIELDS.index("halted_at")]


class FlatAdam:
    """Parameters and Adam state of one :class:`~pyro_elbo.train.TrainState` in flat buffers.

    Use :meth:`bind` (``None`` when the parameters cannot share one vector).
    """

    def __init__(
        self,
        params: dict[str, Tensor],
        opt: torch.optim.Optimizer,
        steps: float,
        step_dtype: torch.dtype,
        limit: int = 1,
    ) -> None:
        tensors = list(params.values())
        self.params = params
        self.optimizer = opt
        self.layout: Layout = tuple((name, tuple(p.shape)) for name, p in params.items())
        with torch.no_grad():
            self.flat = torch.cat([p.detach().reshape(-1) for p in tensors])
            self.exp_avg = torch.cat([_moment(opt, p, "exp_avg") for p in tensors])
            self.exp_avg_sq = torch.cat([_moment(opt, p, "exp_avg_sq") for p in tensors])
        self.steps = torch.full((len(tensors),), steps, dtype=step_dtype, device=self.flat.device)
        offset = 0
        for i, p in enumerate(tensors):
            size = p.numel()
            view = slice(offset, offset + size)
            p.data = self.flat[view].view(p.shape)
            state = opt.state[p]
            state["step"] = self.steps[i]
            state["exp_avg"] = self.exp_avg[view].view(p.shape)
            state["exp_avg_sq"] = self.exp_avg_sq[view].view(p.shape)
            offset += size
        self.state_dict_object = opt.state
        self.pointers = [p.data_ptr() for p in tensors]
        #: :func:`~pyro_elbo.compile.adam.guarded_step`'s ledger, read by the host only now and then
        self.ledger = torch.tensor([limit, 0, 0, 0, 0], dtype=torch.int64, device=self.flat.device)
        self.limit = limit
        #: the ledger's ``skipped`` and ``calls`` when the host last read it
        self.seen_skipped = self.seen_calls = 0
        self.buffers = AdamBuffers(self.flat, self.exp_avg, self.exp_avg_sq, self.steps, self.ledger)
        self.scalars: tuple[tuple[Any, ...], AdamScalars] | None = None
        #: the param group's ``lr``, ``betas`` and ``eps`` objects :attr:`scalars` were made from,
        #: when all are Python numbers (immutable: the same objects hold the same values)
        self.scalar_sources: tuple[Any, Any, Any] | None = None

    @classmethod
    def bind(cls, params: dict[str, Tensor], opt: torch.optim.Optimizer, limit: int = 1) -> FlatAdam | None:
        """Lay ``params`` and their Adam state out flat, with a ledger that halts after ``limit``
        consecutive non-finite steps; ``None`` if they differ in dtype or device, are not dense
        floating point, share memory, or their step counts differ (then the per-parameter graph
        runs)."""
        tensors = list(params.values())
        if not tensors or len({(p.dtype, p.device) for p in tensors}) != 1 or not tensors[0].is_floating_point():
            return None
        if any(p.layout != torch.strided for p in tensors):
            return None
        if _overlap(tensors):
            return None  # parameters sharing memory (tied views): copying them apart would untie them
        states = [opt.state.get(p) for p in tensors]
        counts = {float(s["step"]) for s in states if s}
        if len(counts) > 1 or (counts and not all(states)):
            return None
        dtypes = {s["step"].dtype for s in states if s}
        step_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        return cls(params, opt, counts.pop() if counts else 0.0, step_dtype, limit)

    def valid(self, params: dict[str, Tensor], opt: torch.optim.Optimizer, limit: int = 1) -> bool:
        """The parameters still live in these buffers and the optimizer still holds these views
        (a ``load_state_dict`` replaces ``opt.state``; ``p.data = ...`` moves a parameter), and the
        ledger's limit is ``limit``."""
        return (
            limit == self.limit
            and opt is self.optimizer
            and opt.state is self.state_dict_object
            and len(params) == len(self.pointers)
            and list(map(Tensor.data_ptr, params.values())) == self.pointers
        )

    def step(
        self, compiled: CompiledLoss, group: dict[str, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Tensor, Tensor] | None:
        """One compiled loss, gradient and Adam step written into the buffers; returns the loss
        and ``applied`` as 0-d tensors (nothing changed when not applied: the step was not finite,
        or the ledger had halted), or ``None`` if the graph is not available (run eagerly)."""
        lr, betas, eps = group["lr"], group["betas"], group["eps"]
        sources, scalars = self.scalar_sources, self.scalars
        if (
            scalars is None
            or sources is None
            or lr is not sources[0]
            or betas is not sources[1]
            or eps is not sources[2]
        ):
            scalars = self.scalars = adam_scalars(group, scalars, self.flat.dtype, self.flat.device)
            self.scalar_sources = (lr, betas, eps) if type(betas) is tuple and _numbers(lr, *betas, eps) else None
        out = compiled.flat_adam(self.params, self.layout, self.buffers, scalars[1], args, kwargs)
        if out is None:
            return None
        loss, finite, updated = out
        if updated:
            torch._foreach_copy_(list(self.buffers), updated)
        return loss, finite

    def read_ledger(self) -> tuple[int, int, int]:
        """Read the ledger (one transfer) and return what happened since the last read:
        ``(new_skipped, consecutive, halted_call)``, where ``halted_call`` is the index (from 0)
        among the calls since the last read of the step that halted it, or -1. A halted ledger is
        reset (its run of non-finite steps to 0), so a caller that handles the halt may go on."""
        _, consecutive, skipped, calls, halted_at = self.ledger.tolist()  # in LEDGER_FIELDS order
        new_skipped, first = skipped - self.seen_skipped, self.seen_calls
        self.seen_skipped, self.seen_calls = skipped, calls
        if consecutive < self.limit:
            return new_skipped, consecutive, -1
        with torch.no_grad():
            self.ledger[_RESET_ON_HALT] = 0
        return new_skipped, consecutive, halted_at - first - 1

    def release(self) -> None:
        """Give every parameter and each of its Adam tensors its own memory again (copies of the
        current values): a parameter that stays a view of the shared vector is saved with all of
        it (``torch.save(decoder.state_dict())`` would also write the encoder's weights). The next
        compiled step lays the buffers out again."""
        with torch.no_grad():
            for p in self.params.values():
                if p.data_ptr() in self.pointers:
                    p.data = p.data.clone()
                state = self.optimizer.state.get(p)
                for key in ("exp_avg", "exp_avg_sq", "step"):
                    if state and key in state:
                        state[key] = state[key].clone()


def _numbers(*values: Any) -> bool:
    """Whether every value is a Python ``float`` or ``int`` (immutable, unlike a tensor learning
    rate that a scheduler may change in place)."""
    return all(type(v) is float or type(v) is int for v in values)


def _moment(opt: torch.optim.Optimizer, param: Tensor, key: str) -> Tensor:
    state = opt.state.get(param)
    if state and key in state:
        saved: Tensor = state[key]
        return saved.detach().to(param.dtype).reshape(-1)
    return torch.zeros(param.numel(), dtype=param.dtype, device=param.device)


def _overlap(tensors: list[Tensor]) -> bool:
    """Whether any two tensors' memory spans intersect (views of disjoint parts of one buffer,
    such as an earlier flat layout, do not)."""
    spans = []
    for t in tensors:
        if t.numel():
            extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
            spans.append((t.data_ptr(), t.data_ptr() + extent * t.element_size()))
    spans.sort()
    return any(start < end for (_, end), (start, _) in zip(spans, spans[1:]))
