"""Tracing one training step of a Pyro program into an FX graph, and the checks on that graph.

:func:`trace_step` runs a step function under ``make_fx(tracing_mode="fake")`` with Pyro's and
``torch.distributions``' argument and sample checks off (data-dependent branches; they ran on real
tensors in the eager step before), and turns a failure into a :class:`CaptureError` that says in
the user's terms what cannot be captured, where, and what to change
(:func:`~pyro_elbo._pyro.capture_failures.describe_failure`). The step function reads each
parameter from a function input: through :func:`~pyro_elbo._pyro.params.substituted_params` for
``pyro.param`` statements, and through :func:`module_parameter_slots` for ``nn.Parameter``
attributes a ``PyroModule`` method or a flow's transform reads directly.
:func:`check_no_baked_parameters` refuses a graph in which a trainable tensor became a constant
(it would silently stop training), and :class:`module_state_kept` puts module buffers back after
the runs a capture adds (so running statistics move once per training step, as in eager).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import pyro
import torch
from torch import Tensor

from pyro_elbo._pyro.capture_failures import describe_failure
from pyro_elbo.compile.torch_internals import trace_fake


def trace_step(step: Callable[..., tuple[Tensor, ...]], example: list[Tensor]) -> torch.fx.GraphModule:
    """``step`` traced on fake copies of ``example`` (shapes, dtypes, devices) into an FX graph.

    Raises:
        CaptureError: the trace failed (a Python value from a tensor: ``if``, ``float()``; packed
            sequences; NumPy...); its message names the line of the model or guide, the operation
            and what to change.
    """
    try:
        with validation_off():
            return trace_fake(step, example)
    except Exception as error:
        raise CaptureError(describe_failure(error)) from error


class CaptureError(RuntimeError):
    """The model/guide could not be captured as one graph."""


@contextlib.contextmanager
def validation_off() -> Iterator[None]:
    """Pyro's and every ``torch.distributions`` distribution's argument and support checks off for
    the block (:class:`_no_distribution_validation`): for runs whose values the checks cannot
    help with (a trace on fake tensors; an AIS proposal, whose non-finite density rejects it)."""
    with pyro.validation_enabled(False), _no_distribution_validation():
        yield


class _no_distribution_validation:
    """Distribution argument and sample checks are data-dependent branches: off while capturing.

    Switching the default off is not enough: a distribution built before the capture with checks
    on (a ``PyroSample`` prior made while Pyro's validation was enabled, an autoguide's prototype)
    keeps its own ``_validate_args`` and would check every sample against its support inside the
    trace (``torch.distributions.Distribution._validate_sample``: ``torch._is_all_true(valid)``, a
    guard on data). While capturing, ``_validate_args`` reads ``False`` on every distribution; a
    value assigned meanwhile is kept in the instance and reads again once the capture ends. The
    checks ran on real tensors in the eager step that precedes every capture."""

    def __enter__(self) -> None:
        cls = torch.distributions.Distribution
        self.previous = cls.__dict__["_validate_args"]
        cls._validate_args = property(  # type: ignore[assignment]
            lambda self: False, lambda self, value: self.__dict__.__setitem__("_validate_args", value)
        )

    def __exit__(self, *exc: Any) -> None:
        torch.distributions.Distribution._validate_args = self.previous


def module_parameter_slots(
    programs: tuple[Any, ...], params: dict[str, Tensor]
) -> list[tuple[torch.nn.Module, str, str]]:
    """``(module, attribute, parameter name)`` for every parameter of ``params`` held by a module
    that model or guide is, is a method of (a ``PyroModule`` with ``@pyro_method`` programs), or
    names in its closure or globals (a flow registered with ``pyro.module`` and used as a transform).

    Such a module's ``nn.Parameter`` read outside any ``forward`` (in the method itself, or in a
    flow transform's ``_call``) reaches neither the ``pyro.param`` handler (``PyroModule`` returns
    the attribute, not the statement's value) nor the module forward hooks; the capture puts its
    input in the slot instead. A parameter held in two slots (``AutoNormalizingFlow`` keeps its
    first flow parameter as ``_prototype_tensor`` too) gets its input in both."""
    by_id = {id(t): name for name, t in params.items()}
    slots = []
    seen: set[tuple[int, str]] = set()  # one parameter may sit in several slots: fill each
    for module in reachable_modules(programs):
        for attribute, param in module._parameters.items():
            if param is not None and id(param) in by_id and (id(module), attribute) not in seen:
                seen.add((id(module), attribute))
                slots.append((module, attribute, by_id[id(param)]))
    return slots


class module_state_kept:
    """Put back, on exit, the buffers of every module the programs reach (their ``self``, modules
    in their closures): the runs a capture adds to training (one eager run deciding the particle
    path, the trace itself) must not move running statistics (``nn.BatchNorm1d``'s
    ``running_mean``, ``num_batches_tracked``; a ``BatchNorm`` flow's moving averages, which its
    forward reads), or the compiled path would train from another state than the eager one."""

    def __init__(self, programs: tuple[Any, ...]) -> None:
        self.modules = reachable_modules(programs)

    def __enter__(self) -> None:
        self.saved = [
            (module, name, buffer, buffer.detach().clone())
            for module in self.modules
            for name, buffer in module._buffers.items()
            if buffer is not None
        ]

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for module, name, buffer, value in self.saved:
                module._buffers[name] = buffer
                buffer.copy_(value)


def reachable_modules(programs: tuple[Any, ...]) -> list[torch.nn.Module]:
    """Modules a program is, is a method of, or names (in its closure or as a global of its
    module; ``functools.partial`` seen through), each with its submodules, once."""
    found: dict[int, torch.nn.Module] = {}
    pending = list(programs)
    while pending:
        obj = pending.pop()
        if isinstance(obj, torch.nn.Module):
            found.update((id(m), m) for m in obj.modules())
            continue
        if isinstance(obj, functools.partial):
            pending += [obj.func, *obj.args, *obj.keywords.values()]
        owner = getattr(obj, "__self__", None)
        if isinstance(owner, torch.nn.Module):
            pending.append(owner)
        function = getattr(obj, "__func__", obj)
        values = []
        for cell in getattr(function, "__closure__", None) or ():
            try:
                values.append(cell.cell_contents)
            except ValueError:  # an empty cell
                continue
        code, scope = getattr(function, "__code__", None), getattr(function, "__globals__", {})
        values += [scope[name] for name in (code.co_names if code is not None else ()) if name in scope]
        pending += [value for value in values if isinstance(value, torch.nn.Module)]
    return list(found.values())


class slots_replaced:
    """Put each slot's replacement (by parameter name) in its module for the duration."""

    def __init__(self, slots: list[tuple[torch.nn.Module, str, str]], values: dict[str, Tensor]) -> None:
        self.slots, self.values = slots, values

    def __enter__(self) -> None:
        self.originals = [(module, attribute, module._parameters[attribute]) for module, attribute, _ in self.slots]
        for module, attribute, name in self.slots:
            module._parameters[attribute] = self.values[name]  # type: ignore[assignment]

    def __exit__(self, *exc: Any) -> None:
        for module, attribute, original in self.originals:
            module._parameters[attribute] = original


def check_no_baked_parameters(graph: torch.fx.GraphModule, params: dict[str, Tensor] | None = None) -> None:
    """A trainable tensor captured as a constant would silently stop training: refuse, naming
    the parameter when it is one the step updates."""
    names = {_storage(t): name for name, t in (params or {}).items() if t.numel()}
    for _, param in graph.named_parameters():
        if param.numel() and _storage(param) in names:
            raise CaptureError(
                f"the parameter '{names[_storage(param)]}' is read where the capture cannot replace it (outside "
                "a pyro.param statement and a module's forward) and would be baked in as a constant"
            )
    for name, value in graph.named_buffers():
        if value.requires_grad:
            raise CaptureError(f"a trainable tensor ({name}) was captured as a constant; register it with pyro.module")
    for name in dir(graph):
        if name.startswith("_tensor_constant"):
            value = getattr(graph, name)
            if isinstance(value, Tensor) and value.requires_grad:
                raise CaptureError(
                    "a trainable tensor not known to the param store was captured as a constant; register "
                    "its module with pyro.module (or use a PyroModule)"
                )


def detach_untrained_parameters(graph: torch.fx.GraphModule) -> int:
    """Make the parameters the graph holds as constants plain tensors; returns how many.

    A module parameter the step reads but the param store does not hold (two modules registered
    under one name, as Pyro's CEVAE model and guide do: the store keeps the first one's tensors,
    and the other's are not trained, eagerly or by Pyro) is captured as a constant that still
    requires grad. The graph already holds its own backward pass, but a compiler seeing an input
    that requires grad differentiates the graph again (AOTAutograd's joint graph), which fails once
    the step writes its buffers in place. Detached (the same storage), the constant is what it was
    on the eager path: read, never trained. Run after :func:`check_no_baked_parameters`."""
    detached = 0
    for name, param in list(graph.named_parameters()):
        owner_name, _, attribute = name.rpartition(".")
        owner = graph.get_submodule(owner_name) if owner_name else graph
        del owner._parameters[attribute]
        owner.register_buffer(attribute, param.detach())
        detached += 1
    return detached


def _storage(tensor: Tensor) -> tuple[str, int]:
    return (str(tensor.device), tensor.untyped_storage().data_ptr())
