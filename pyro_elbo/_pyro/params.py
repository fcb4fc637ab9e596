"""Pyro parameters: discovery, the trainable leaves behind them, and running a program with its
parameters detached or replaced.

Parameters reach a Pyro program in two ways: ``pyro.param`` statements (the param store and
``PyroModule`` attributes), answered by the handlers here, and ``nn.Module`` parameters read inside a
module's ``forward`` (``pyro.module`` networks), replaced by a pair of global module forward hooks
that are registered only while a replacement context is active (:func:`module_params_replaced`).
Parameters read outside a module's ``forward`` are not covered by the hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from torch import Tensor
from torch.distributions import constraints, transform_to

from pyro_elbo._pyro import checks
from pyro_elbo._random import forked_rng
from pyro_elbo._typing import Guide, Model

T = TypeVar("T")


def has_trainable_params(trace: Trace) -> bool:
    return any(
        site["type"] == "param" and isinstance(site["value"], Tensor) and site["value"].requires_grad
        for site in trace.nodes.values()
    )


def trainable_params(trace: Trace) -> dict[str, Tensor]:
    """The ``pyro.param`` sites of a trace that require gradients: name -> the *unconstrained* leaf
    tensor an optimizer updates (``PyroModule`` and param-store values carry a reference to it)."""
    params: dict[str, Tensor] = {}
    for name, site in trace.nodes.items():
        if site["type"] != "param":
            continue
        value: Tensor = site["value"]  # type: ignore[assignment]
        ref = getattr(value, "unconstrained", None)
        leaf: Tensor = ref() if ref is not None else value
        if leaf.requires_grad:
            params[name] = leaf
    return params


def discover_params(model: Model, guide: Guide, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
    """Create every lazily initialized parameter of guide and model (without using the caller's
    random stream) and return :func:`trainable_params` of that run, in a deterministic order."""
    try:
        with forked_rng(), poutine.trace(param_only=True) as capture:
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            poutine.replay(model, trace=guide_trace)(*args, **kwargs)
    except ValueError as error:  # Pyro's bare plate shape mismatch, named (a missing .to_event)
        named = checks.plate_mismatch_error(error)
        if named is None:
            raise
        raise named from error
    return trainable_params(capture.trace)


def loss_and_params(fn: Callable[[], T]) -> tuple[T, dict[str, Tensor]]:
    """Run ``fn`` (a loss computation that runs Pyro programs) and return its result with the
    trainable parameters it read: name -> the unconstrained leaf an optimizer updates."""
    with poutine.trace(param_only=True) as capture:
        loss = fn()
    return loss, trainable_params(capture.trace)


def constrained_value(name: str, unconstrained: Tensor) -> Tensor:
    """The constrained value of a param-store parameter given its unconstrained leaf (the leaf
    itself for module parameters and anything the store does not hold under ``name``)."""
    store = pyro.get_param_store()
    if name in store and getattr(store.get_param(name), "unconstrained")() is unconstrained:  # noqa: B009
        return store.get_param(name)
    return unconstrained


# --------------------------------------------------------------------------------------------
# evaluating a program with its parameters replaced (detached, or by other tensors)


def _keep_param_links(new: Tensor, old: Tensor) -> Tensor:
    """Carry a parameter value's link to its unconstrained leaf over to a replacement value: the
    plate that subsamples a ``pyro.param(..., event_dim=...)`` (its post-processing runs after
    ours) looks it up."""
    for attr in ("unconstrained", "_pyro_unconstrained_param"):
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))
    return new


class _DetachParams(Messenger):
    """Detaches the value of every ``pyro.param`` statement (param store and PyroModule params),
    including a value an inner handler such as :class:`_SubstituteParams` has set."""

    def _pyro_post_param(self, msg: Any) -> None:
        value = msg["value"]
        if isinstance(value, Tensor):
            msg["value"] = _keep_param_links(value.detach(), value)


class _SubstituteParams(Messenger):
    """Answers ``pyro.param`` statements named in ``values`` with ``transform_to(constraint)`` of
    the given unconstrained tensors, without reading the param store's tensors."""

    def __init__(self, values: dict[str, Tensor]) -> None:
        super().__init__()
        self.values = values

    def _pyro_param(self, msg: Any) -> None:
        name = msg["name"]
        if name in self.values:
            store = pyro.get_param_store()
            constraint = store._constraints.get(name) or msg["kwargs"].get("constraint") or constraints.real
            value = transform_to(constraint)(self.values[name])
            setattr(value, "_pyro_unconstrained_param", self.values[name])  # noqa: B010
            msg["value"] = value
            msg["done"] = True


#: replacement functions for module parameters, innermost last; composed by one pair of hooks
_MODULE_PARAM_MAPS: list[Callable[[Tensor, Tensor], Tensor]] = []
_SWAPPED: dict[int, tuple[torch.nn.Module, int, dict[str, Tensor]]] = {}


def _swap_pre_hook(module: torch.nn.Module, inputs: Any) -> None:
    key = id(module)
    if key in _SWAPPED:
        mod, depth, originals = _SWAPPED[key]
        _SWAPPED[key] = (mod, depth + 1, originals)
        return
    originals = {n: p for n, p in module._parameters.items() if p is not None}
    for name, param in originals.items():
        value: Tensor = param
        for fn in _MODULE_PARAM_MAPS:
            value = fn(param, value)
        if value is not param:
            module._parameters[name] = value  # type: ignore[assignment]
    _SWAPPED[key] = (module, 1, originals)


def _swap_post_hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
    key = id(module)
    if key not in _SWAPPED:
        return
    mod, depth, originals = _SWAPPED[key]
    if depth > 1:
        _SWAPPED[key] = (mod, depth - 1, originals)
        return
    module._parameters.update(originals)  # type: ignore[arg-type]
    del _SWAPPED[key]


@contextlib.contextmanager
def module_params_replaced(fn: Callable[[Tensor, Tensor], Tensor]) -> Iterator[None]:
    """While each ``nn.Module``'s ``forward`` runs, its parameters are ``fn(param, current)``.

    Covers ``pyro.module`` networks; parameters read outside a module's ``forward`` are not.
    Nested uses compose (the innermost applies last)."""
    handles = []
    if not _MODULE_PARAM_MAPS:
        handles = [
            torch.nn.modules.module.register_module_forward_pre_hook(_swap_pre_hook),
            torch.nn.modules.module.register_module_forward_hook(_swap_post_hook, always_call=True),
        ]
    _MODULE_PARAM_MAPS.append(fn)
    try:
        yield
    finally:
        _MODULE_PARAM_MAPS.pop()
        if not _MODULE_PARAM_MAPS:
            for handle in handles:
                handle.remove()
            for mod, _, originals in list(_SWAPPED.values()):  # a forward that raised
                mod._parameters.update(originals)  # type: ignore[arg-type]
            _SWAPPED.clear()


@contextlib.contextmanager
def params_stopped() -> Iterator[None]:
    """Run a Pyro program with all of its parameters detached from the autograd graph."""
    with module_params_replaced(lambda param, value: value.detach()), _DetachParams():
        yield


@contextlib.contextmanager
def substituted_params(values: dict[str, Tensor]) -> Iterator[None]:
    """Run a Pyro program with the named parameters' *unconstrained* tensors replaced by
    ``values`` (``pyro.param`` statements and the ``nn.Module`` parameters the param store knows
    under those names): the program becomes a pure function of ``values``, as a whole-step
    capture needs."""
    store = pyro.get_param_store()
    by_id = {id(store._params[name]): tensor for name, tensor in values.items() if name in store._params}

    def module_value(param: Tensor, value: Tensor) -> Tensor:
        return by_id.get(id(param), value)

    with module_params_replaced(module_value), _SubstituteParams(values):
        yield
