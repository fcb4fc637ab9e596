"""Whole-step capture: an objective's loss and gradients as one compiled graph.

Pyro's per-step cost on small and medium models is Python: handlers rebuilt every step, traces,
distribution objects. :class:`CompiledLoss` runs the whole computation once under
``make_fx(tracing_mode="fake")`` with every parameter answered by a function input
(:func:`~pyro_elbo.weights.substituted_params`), which records only the tensor operations of
particles, guide, model, objective and ``autograd.grad``. The graph is then compiled by inductor
(:func:`~pyro_elbo.compile.inductor.compile_graph`: inductor's ``compile_fx``, a private API that skips
Dynamo's per-call guards, with ``torch.compile`` as the fallback). Random operations stay operations, so every call draws fresh
randomness. One graph is kept per input signature (shapes, dtypes, devices, non-tensor args).

With a plain Adam optimizer the update runs inside the graph too. :meth:`CompiledLoss.flat_adam`
takes all parameters as one flat vector :math:`\\theta \\in \\mathbb{R}^D` and the Adam moments as
two more (:mod:`pyro_elbo.compile.flat` keeps them there), differentiates with respect to that
vector, and applies :func:`~pyro_elbo.compile.adam.flat_adam_update` only where the loss and
gradient are finite and the non-finite ledger (:func:`~pyro_elbo.compile.adam.guarded_step`) has
not halted; on CPU the graph writes the four vectors
and the ledger in place, so a step allocates no per-parameter outputs and reads nothing back. For
inductor, ``torch.empty(shape).normal_()`` draws are rewritten to ``torch.randn`` so that they are
generated inside the fused kernel (:func:`~pyro_elbo.compile.rewrites.standard_normals_as_randn`).

A model that cannot be captured (``.item()``, ``float(tensor)`` or a tensor-valued ``if`` in the
model, NumPy randomness, data-dependent shapes) falls back to the ordinary eager path with one
warning that says why.
"""

from __future__ import annotations

import copy
import operator
import time
import warnings
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from pyro_elbo._pyro.capture import (
    CaptureError,
    check_no_baked_parameters,
    detach_untrained_parameters,
    module_parameter_slots,
    module_state_kept,
    slots_replaced,
    trace_step,
)
from pyro_elbo._pyro.capture_failures import describe_failure, user_stacklevel
from pyro_elbo._pyro.params import substituted_params
from pyro_elbo._random import forked_rng
from pyro_elbo._typing import Guide, Model
from pyro_elbo.compile.adam import (
    AdamBuffers,
    AdamMoments,
    AdamScalars,
    Layout,
    adam_update,
    all_finite,
    flat_adam_update,
    guarded_step,
    split,
)
from pyro_elbo.compile.fused_rewrites import FUSED_REWRITES
from pyro_elbo.compile.inductor import CompileStats, compile_graph, start_cpu_check
from pyro_elbo.compile.progress import phase
from pyro_elbo.compile.rewrites import (
    constant_masks_as_indices,
    linalg_errors_as_nan,
    outer_contractions_as_matmul,
    standard_normals_as_randn,
)
from pyro_elbo.compile.torch_internals import is_fake

Signature = tuple[Any, ...]


class LossFunction(Protocol):
    """What a capture needs of an objective (:class:`~pyro_elbo.Objective` is one)."""

    retain_graph: bool | None

    def differentiable_loss(self, model: Model, guide: Guide, *args: Any, **kwargs: Any) -> Tensor: ...

    def plate_nesting(self, model: Model, guide: Guide, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int: ...


class CompiledLoss:
    """``(params, args, kwargs) -> (loss, grads)`` for one objective, model and guide.

    Args:
        objective: a :class:`~pyro_elbo.Objective`.
        model, guide: the Pyro program.
        backend: ``"inductor"`` (default), any ``torch.compile`` backend, or ``"eager"`` to run the
            captured graph without compiling it (same random draws as the eager path: for tests).
    """

    def __init__(
        self, objective: LossFunction, model: Model, guide: Guide, *, backend: str = "inductor", adam: bool = False
    ) -> None:
        self.adam = adam
        #: ``((lr, beta1, beta2, eps), dtype, device)`` and those values as tensors, kept between
        #: steps so the in-graph Adam update gets new scalar tensors only when they change
        self.adam_scalars: tuple[Any, AdamScalars] | None = None
        self.objective = objective
        self.model = model
        self.guide = guide
        self.backend = backend
        self.graphs: dict[Signature, Callable[..., Any]] = {}
        self.capture_seconds: dict[Signature, float] = {}
        #: what inductor (or ``torch.compile``) did for each graph: cache outcome, fallback, seconds
        self.compile_stats: dict[Signature, CompileStats] = {}
        self._captured_stats = CompileStats()  # those of the graph _capture just returned
        self.failed: str | None = None
        #: signatures whose graph runs as CUDA graphs (inductor's cudagraph trees, CUDA only)
        self.cudagraphs: set[Signature] = set()
        self._captured_cudagraphs = False  # the graph _capture just returned runs as CUDA graphs
        self._in_eager_run = False  # _capture is running the step eagerly (its errors are the program's)
        #: the last call's quick key, its signature and the objects the key names by ``id`` (held,
        #: so that no other object can take one of those ids while the key is kept)
        self._last: tuple[Any, Signature, Any] | None = None
        #: the signature and graph of the last call (not for CUDA graphs, whose outputs are copied)
        self._hot: tuple[Signature, Callable[..., Any]] | None = None
        #: the last :meth:`flat_adam` call, to be repeated while its objects and layouts hold
        self._flat_call: _FlatCall | None = None

    def __call__(
        self,
        params: dict[str, Tensor],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        adam: tuple[AdamMoments, AdamScalars] | None = None,
    ) -> tuple[Tensor, Tensor, list[Tensor]] | None:
        """The loss, whether it and every gradient are finite, and the gradient of each parameter;
        or ``None`` if capture failed (warned once). With ``adam=True`` the last list holds the
        updated parameters, first moments, second moments and step instead of the gradients, given
        the optimizer's state and scalars in ``adam``."""
        if self.failed is not None:
            return None
        adam_inputs: list[Tensor] = []
        if adam is not None:
            moments, scalars = adam
            adam_inputs = [*moments.exp_avg, *moments.exp_avg_sq, moments.step, *scalars]
        tensors = [a for a in args if isinstance(a, Tensor)] + adam_inputs
        # the same parameter and argument objects, of the same layout, as last call: same graph
        values = tuple(params.values())
        quick_key = (_arg_keys(values), _arg_keys(args), tuple(kwargs.items()))
        if self._last is not None and self._last[0] == quick_key:
            signature = self._last[1]
        else:
            signature = _signature(params, args, kwargs)
            self._last = (quick_key, signature, (values, args))
        detached = [p.detach() for p in params.values()]
        inputs = [*detached, *adam_inputs]
        return self._run(signature, lambda: self._capture(params, None, args, kwargs, inputs), [*detached, *tensors])

    def forget_inputs(self) -> None:
        """Drop the objects the last call's keys hold (the flat buffers and arguments), e.g. once
        the flat buffers are released; the next call checks its signature afresh."""
        self._last = self._flat_call = None

    def flat_adam(
        self,
        params: dict[str, Tensor],
        layout: Layout,
        buffers: AdamBuffers,
        scalars: AdamScalars,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[Tensor, Tensor, list[Tensor]] | None:
        """Loss, gradient and Adam update of all parameters held in one flat vector.

        ``buffers``: the parameters :math:`\\theta` concatenated in ``layout`` order (``(name,
        shape)`` per parameter; ``params`` are the parameter tensors themselves, views of
        ``buffers.params``), the Adam moments :math:`m, v` laid out alike, one step count per
        parameter, and the non-finite ledger of :func:`~pyro_elbo.compile.adam.guarded_step`.
        Returns the loss, ``applied`` (the step was finite and the ledger had not halted) and the
        step's :math:`(\\theta', m', v', t')` (:func:`~pyro_elbo.compile.adam.flat_adam_update`) under
        :math:`x' = \\mathrm{where}(\\text{applied}, x_{\\text{new}}, x)`, then the new ledger, so
        a refused step changes nothing and the host reads no flag to keep it from writing. On CPU
        the graph writes them into the five buffers itself and the list is empty (no output
        buffers, no copy); on CUDA, where a graph that writes its inputs does not run as CUDA
        graphs, it returns them for the caller to copy. ``None``: capture failed (warned).
        """
        if self.failed is not None:
            return None
        items = tuple(kwargs.items()) if kwargs else ()
        call = self._flat_call
        if call is not None and call.repeats(self._hot, buffers, layout, args, items):
            outputs = call.graph(*call.inputs, *scalars)
            return outputs[0], outputs[1], list(outputs[2:])
        tensors = [a for a in args if isinstance(a, Tensor)]
        # the layout itself, not its id: a freed layout's id may be reused by another one
        first = buffers.params
        quick_key = (id(first), first.dtype, first.device, layout, _arg_keys(args), items)
        last = self._last
        again = last is not None and last[0] == quick_key  # the same objects as the last call
        if last is not None and again:
            signature = last[1]
        else:
            signature = ("flat", _signature(params, args, kwargs))
            self._last = (quick_key, signature, (first, args))
        state = [*buffers, *scalars]
        leading = (buffers.params, *tensors, *buffers[1:])
        out = self._run(signature, lambda: self._capture(params, layout, args, kwargs, state), [*leading, *scalars])
        hot = self._hot
        # kept once a call repeats the last one's objects (minibatches, new tensors each step, never do)
        self._flat_call = (
            _FlatCall(hot, buffers, layout, args, items, (first, *tensors), leading)
            if again and out is not None and hot is not None and hot[0] is signature
            else None
        )
        return out

    def _run(
        self,
        signature: Signature,
        capture: Callable[[], Callable[..., Any]],
        inputs: list[Tensor],
    ) -> tuple[Tensor, Tensor, list[Tensor]] | None:
        """Call the graph of ``signature`` on ``inputs``, capturing and compiling it first if new."""
        hot = self._hot
        if hot is not None and hot[0] is signature:  # the graph of the last call: no lookups
            outputs = hot[1](*inputs)
            return outputs[0], outputs[1], list(outputs[2:])
        graph = self.graphs.get(signature)
        new = graph is None
        start = time.perf_counter()
        if graph is None:
            saved = _objective_state(self.objective)
            try:
                graph = capture()
                _refuse_traced_state(self.objective)
            except Exception as error:  # CaptureError: the user's program; anything else: torch's internals
                _restore_objective_state(self.objective, saved)  # the eager path continues from it
                if self._in_eager_run:  # the model/guide itself raised, as it would on the eager path
                    self._in_eager_run = False
                    raise
                self.failed = str(error) if isinstance(error, CaptureError) else _internal_failure(error)
                cause = (
                    "the model/guide cannot be captured as one graph"
                    if isinstance(error, CaptureError)
                    else "capturing or compiling the step failed inside torch"
                )
                warnings.warn(
                    f"compile=True: falling back to the eager path because {cause}: {self.failed}",
                    RuntimeWarning,
                    stacklevel=user_stacklevel(),
                )
                return None
            self.graphs[signature] = graph
            self.compile_stats[signature] = self._captured_stats
            if self._captured_cudagraphs:
                self.cudagraphs.add(signature)
        replayed = signature in self.cudagraphs
        try:
            if replayed:  # a new step: outputs of the previous replay may be overwritten from now on
                torch.compiler.cudagraph_mark_step_begin()
            outputs = graph(*inputs)
            if replayed:  # replay buffers belong to the graph: keep copies the caller may hold
                outputs = [o.clone() for o in outputs]
        except Exception as error:
            if not new:
                raise
            _restore_objective_state(self.objective, saved)
            del self.graphs[signature]
            self.compile_stats.pop(signature, None)
            self.failed = f"compiling the captured graph failed: {type(error).__name__}: {_first_line(error)}"
            warnings.warn(
                f"compile=True: falling back to the eager path; {self.failed}",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
            return None
        if new:  # capture + compilation (torch.compile compiles on the first call)
            self.capture_seconds[signature] = time.perf_counter() - start
        self._hot = None if replayed else (signature, graph)
        return outputs[0], outputs[1], list(outputs[2:])

    def _capture(
        self,
        params: dict[str, Tensor],
        layout: Layout | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        state: list[Tensor],
    ) -> Callable[..., Any]:
        """Trace the step and compile it. ``state``: the parameter inputs (one per parameter, or
        the flat vector when ``layout`` is given), then the Adam inputs if any."""
        names = list(params)
        self._captured_cudagraphs = False
        tensor_positions = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
        objective, model, guide = self.objective, self.model, self.guide
        if self.backend == "inductor" and all(t.device.type == "cpu" for t in state):
            start_cpu_check()  # inductor's CPU check runs in the background during the eager run and trace
        self._in_eager_run = True
        with phase("eager run"):
            objective.plate_nesting(model, guide, args, kwargs)  # guessed eagerly, once
            with module_state_kept((model, guide)):  # the capture's own runs leave running statistics alone
                _decide_eagerly(objective, model, guide, args, kwargs)
        self._in_eager_run = False
        num_params = 1 if layout is not None else len(names)
        leading, adam_inputs = state[:num_params], state[num_params:]
        # on CPU the flat graph writes its inputs; CUDA graphs are not used for a graph that
        # mutates its inputs, so there it returns the new values and the caller copies them
        in_place = layout is not None and graph_writes_inputs(leading[0].device)
        num_data, adam = len(tensor_positions), self.adam
        slots = module_parameter_slots((model, guide), params)

        def loss_of(wanted: list[Tensor], data: tuple[Tensor, ...]) -> Tensor:
            call_args = list(args)
            for position, tensor in zip(tensor_positions, data):
                call_args[position] = tensor
            inputs = dict(zip(names, wanted))
            with substituted_params(inputs), slots_replaced(slots, inputs):
                return objective.differentiable_loss(model, guide, *call_args, **kwargs)

        def step(*flat: Tensor) -> tuple[Tensor, ...]:
            data, moments = flat[num_params : num_params + num_data], flat[num_params + num_data :]
            if layout is not None:  # one flat parameter vector: views in, one flat gradient out
                loss = loss_of(split(flat[0], layout), data)
                (grad,) = torch.autograd.grad(loss, [flat[0]], allow_unused=True)
                grad = torch.zeros_like(flat[0]) if grad is None else grad
                finite = torch.isfinite(loss).all() & torch.isfinite(grad).all()
                old = AdamBuffers(flat[0].detach(), *moments[:4])
                applied, new_ledger = guarded_step(finite, old.ledger)
                new = flat_adam_update(old.params, grad, old.exp_avg, old.exp_avg_sq, old.steps, *moments[4:])
                kept = [*(torch.where(applied, n, o) for n, o in zip(new, old)), new_ledger]
                if not in_place:
                    return (loss.detach(), applied, *kept)
                with torch.no_grad():  # the graph writes its inputs: no output buffers, no copy after
                    for target, value in zip(old, kept):
                        target.copy_(value)
                return (loss.detach(), applied)
            wanted = list(flat[:num_params])
            loss = loss_of(wanted, data)
            raw = torch.autograd.grad(loss, wanted, allow_unused=True)
            grads = [torch.zeros_like(t) if g is None else g for t, g in zip(wanted, raw)]
            finite = all_finite(loss, grads)
            if not adam:
                return (loss.detach(), finite, *grads)
            n = len(wanted)
            adam_state = AdamMoments(list(moments[:n]), list(moments[n : 2 * n]), moments[2 * n])
            return (loss.detach(), finite, *adam_update(wanted, grads, adam_state, AdamScalars(*moments[2 * n + 1 :])))

        inputs = [args[i] for i in tensor_positions] + list(adam_inputs)
        trainable = [True] if layout is not None else [p.requires_grad for p in params.values()]
        example = [t.detach().clone().requires_grad_(g) for t, g in zip(leading, trainable)]
        skipped: set[str] = set()  # rewrites that failed: the step is traced again without them
        while True:
            with phase("trace"), module_state_kept((model, guide)):
                graph = trace_step(step, example + inputs)
            check_no_baked_parameters(graph, params)
            detach_untrained_parameters(graph)
            failed = _rewrite(graph, self.backend, skipped)
            if failed is None:
                break
            skipped.add(failed)
        compiled, self._captured_cudagraphs, self._captured_stats = compile_graph(graph, leading + inputs, self.backend)
        return compiled


#: the graph rewrites, in order: name, function, whether the ``"eager"`` backend applies it (it
#: keeps the eager path's draws, for tests), and what the step loses when the rewrite fails
_REWRITES: tuple[tuple[str, Callable[[torch.fx.GraphModule], int], bool, str], ...] = (
    (
        "linalg_errors_as_nan",
        linalg_errors_as_nan,
        True,
        "inductor does not cache a graph with torch.linalg's error checks, and a failed factorization "
        "raises instead of being refused as a non-finite step",
    ),
    (
        "constant_masks_as_indices",
        constant_masks_as_indices,
        True,
        "indexing by a constant boolean mask keeps a data-dependent shape, which inductor may refuse",
    ),
    ("standard_normals_as_randn", standard_normals_as_randn, False, "normal draws are not generated in fused kernels"),
    (
        "outer_contractions_as_matmul",
        outer_contractions_as_matmul,
        False,
        "contractions over long outer dimensions stay inductor reductions (slower steps)",
    ),
    *FUSED_REWRITES,
)


def _rewrite(graph: torch.fx.GraphModule, backend: str, skipped: set[str]) -> str | None:
    """Apply the graph rewrites (:data:`_REWRITES`) that ``backend`` uses and ``skipped`` does not
    hold, in place. A rewrite that raises (it reads fake-tensor metadata and aten operations whose
    form a torch release may change) is warned about once, naming what the step loses without it,
    and its name is returned: the graph may be half rewritten, so the caller traces it again
    without that rewrite. ``None``: every rewrite applied."""
    for name, rewrite, always, lost in _REWRITES:
        if name in skipped or not (always or backend != "eager"):
            continue
        try:
            rewrite(graph)
        except Exception as error:
            warnings.warn(
                f"compile=True: the graph rewrite {name} failed ({type(error).__name__}: {_first_line(error)}); "
                f"the step is compiled without it: {lost}",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
            return name
    return None


def _first_line(error: BaseException) -> str:
    """The first line of ``error``'s message, with the next one when it ends with a colon (torch's
    ``backend='inductor' raised:``, then the error the backend raised)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return ""
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def _internal_failure(error: BaseException) -> str:
    """A failure in torch's machinery (not a :class:`CaptureError`): the error, and the user's line
    when a traceback in its chain reaches one."""
    return f"{type(error).__name__}: {_first_line(error)} ({describe_failure(error)})"


def graph_writes_inputs(device: torch.device) -> bool:
    """Whether the flat step's graph writes its buffers itself (CPU) or returns the new values for
    the caller to copy (CUDA, where inductor runs a graph that mutates its inputs without CUDA
    graphs)."""
    return device.type != "cuda"


def _decide_eagerly(
    objective: LossFunction, model: Model, guide: Guide, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Run the loss once eagerly (forked random stream, a copy of the objective so that its state
    is untouched) so that choices made on a first call, such as the particle path, are made on
    real tensors: made while tracing, their trial runs would be recorded into the graph and draw
    random numbers on every step."""
    trial = copy.copy(objective)
    with forked_rng():
        trial.differentiable_loss(model, guide, *args, **kwargs)
    # state the first call creates (ELBO's running baseline of a discrete guide site) is adopted
    # from the trial run, so the graph is traced against real state that it updates in place,
    # never against a first call's initialization (which would be recorded for every step)
    mine, theirs = _objective_state(objective), _objective_state(trial)
    if mine is not None and theirs is not None:
        merged, changed = _with_missing(mine, theirs)
        if changed:
            _restore_objective_state(objective, merged)


def _objective_state(objective: Any) -> Any:
    """The objective's own training state (``state_dict()``), ``None`` if it keeps none."""
    state_dict = getattr(objective, "state_dict", None)
    return state_dict() if callable(state_dict) and callable(getattr(objective, "load_state_dict", None)) else None


def _restore_objective_state(objective: Any, state: Any) -> None:
    if state is not None:
        objective.load_state_dict(state)


def _with_missing(mine: Any, theirs: Any) -> tuple[Any, bool]:
    """``mine`` with the entries of ``theirs`` it lacks (nested dicts), and whether any were added."""
    if not (isinstance(mine, dict) and isinstance(theirs, dict)):
        return mine, False
    merged, changed = dict(mine), False
    for key, value in theirs.items():
        if key in mine:
            merged[key], added = _with_missing(mine[key], value)
            changed = changed or added
        else:
            merged[key], changed = value, True
    return merged, changed


def _refuse_traced_state(objective: Any) -> None:
    """A trace that left fake values in the objective's state created that state while tracing:
    the graph would repeat a first call's initialization on every step instead of carrying the
    state, so the step is not compiled."""

    def leaves(value: Any) -> list[Any]:
        return [leaf for v in value.values() for leaf in leaves(v)] if isinstance(value, dict) else [value]

    state = _objective_state(objective)
    if state is not None and any(is_fake(leaf) for leaf in leaves(state)):
        raise CaptureError(
            f"{type(objective).__name__}'s own state (its running baselines) was created while the step was "
            "traced, so the graph would not carry it from step to step"
        )


def _arg_keys(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The arguments' identities, with each tensor's shape, strides, dtype and device: a tensor
    given again with new contents (``x.data = other``) of another layout, dtype or device is a new
    signature, not the old graph."""
    return tuple((id(a), a.shape, a.stride(), a.dtype, a.device) if isinstance(a, Tensor) else id(a) for a in args)


def _tensor_layouts(tensors: tuple[Tensor, ...]) -> list[tuple[Any, ...]]:
    """Each tensor's shape, strides, dtype and device: what a compiled graph was specialized to
    (inductor's CPU graphs do not check them: ``size_asserts`` off)."""
    return [(t.shape, t.stride(), t.dtype, t.device) for t in tensors]


class _FlatCall:
    """A :meth:`CompiledLoss.flat_adam` call that ran a compiled graph, kept so that the next call
    with the same objects skips the signature check and the building of the input list.

    The call repeats (:meth:`repeats`) while the graph is still the last one run (``run``, the
    ``CompiledLoss._hot`` it was made from: any other call or a recompile replaces that), the
    buffers and the layout are the same objects, the arguments are the same objects (all held
    here, so that no other object can take their ids), the kwargs are equal, and the flat vector
    and every tensor argument still have the shape, strides, dtype and device the graph was
    compiled for (``x.data = other`` keeps the object and may change them). The Adam scalars are
    not part of it: they are passed on each call (0-d tensors of the flat vector's dtype and
    device, so of the graph's signature whatever their values).
    """

    __slots__ = ("run", "graph", "buffers", "layout", "args", "items", "tensors", "layouts", "inputs")

    def __init__(
        self,
        run: tuple[Signature, Callable[..., Any]],
        buffers: AdamBuffers,
        layout: Layout,
        args: tuple[Any, ...],
        items: tuple[Any, ...],
        tensors: tuple[Tensor, ...],
        inputs: tuple[Tensor, ...],
    ) -> None:
        self.run, self.graph = run, run[1]
        self.buffers, self.layout, self.args, self.items = buffers, layout, args, items
        #: the graph's inputs before the Adam scalars
        self.tensors, self.layouts, self.inputs = tensors, _tensor_layouts(tensors), inputs

    def repeats(
        self,
        run: tuple[Signature, Callable[..., Any]] | None,
        buffers: AdamBuffers,
        layout: Layout,
        args: tuple[Any, ...],
        items: tuple[Any, ...],
    ) -> bool:
        """Whether a call with these objects runs this graph on :attr:`inputs` (then the scalars)."""
        return (
            run is self.run
            and buffers is self.buffers
            and layout is self.layout
            and (args is self.args or _same_objects(args, self.args))
            and items == self.items
            and _tensor_layouts(self.tensors) == self.layouts
        )


def _same_objects(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Whether two tuples hold the same objects, in order (``step(state, x, y)`` builds a new tuple
    of the same tensors each call)."""
    return len(a) == len(b) and all(map(operator.is_, a, b))


def _signature(params: dict[str, Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Signature:
    def describe(value: Any) -> Any:
        if isinstance(value, Tensor):
            return ("tensor", tuple(value.shape), value.stride(), value.dtype, value.device)
        if isinstance(value, (int, float, str, bool, type(None))):
            return ("value", value)
        return ("object", id(value))

    return (
        tuple((name, describe(p)) for name, p in params.items()),
        tuple(describe(a) for a in args),
        tuple(sorted((k, describe(v)) for k, v in kwargs.items())),
    )
