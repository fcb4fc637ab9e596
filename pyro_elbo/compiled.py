"""Whole-step capture: an objective's loss and gradients as one compiled graph.

Pyro's per-step cost on small and medium models is Python: handlers rebuilt every step, traces,
distribution objects. :class:`CompiledLoss` runs the whole computation once under
``make_fx(tracing_mode="fake")`` with every parameter answered by a function input
(:func:`~pyro_elbo.weights.substituted_params`), which records only the tensor operations of
particles, guide, model, objective and ``autograd.grad``. The graph is then compiled by inductor
(:func:`~pyro_elbo._inductor.compile_graph`: inductor's ``compile_fx``, a private API that skips
Dynamo's per-call guards, with ``torch.compile`` as the fallback). Random operations stay operations, so every call draws fresh
randomness. One graph is kept per input signature (shapes, dtypes, devices, non-tensor args).

With a plain Adam optimizer the update runs inside the graph too. :meth:`CompiledLoss.flat_adam`
takes all parameters as one flat vector :math:`\\theta \\in \\mathbb{R}^D` and the Adam moments as
two more (:mod:`pyro_elbo.train.flat` keeps them there), differentiates with respect to that
vector, and applies :func:`flat_adam_update` only where the loss and gradient are finite and the
non-finite ledger (:func:`guarded_step`) has not halted; on CPU the graph writes the four vectors
and the ledger in place, so a step allocates no per-parameter outputs and reads nothing back. For
inductor, ``torch.empty(shape).normal_()`` draws are rewritten to ``torch.randn`` so that they are
generated inside the fused kernel (:func:`~pyro_elbo._graph_rewrites.standard_normals_as_randn`).

A model that cannot be captured (``.item()``, ``float(tensor)`` or a tensor-valued ``if`` in the
model, NumPy randomness, data-dependent shapes) falls back to the ordinary eager path with one
warning that says why.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import pyro
import torch
from torch import Tensor

from pyro_elbo._compile_progress import phase
from pyro_elbo._fused_rewrites import FUSED_REWRITES
from pyro_elbo._graph_rewrites import (
    constant_masks_as_indices,
    linalg_errors_as_nan,
    outer_contractions_as_matmul,
    standard_normals_as_randn,
)
from pyro_elbo._inductor import compile_graph, start_cpu_check
from pyro_elbo._pyro.cache import ProgramCache
from pyro_elbo._pyro.capture import (
    CaptureError,
    check_no_baked_parameters,
    module_parameter_slots,
    module_state_kept,
    slots_replaced,
    trace_step,
)
from pyro_elbo._pyro.capture_failures import describe_failure
from pyro_elbo._pyro.params import loss_and_params, substituted_params
from pyro_elbo._random import forked_rng
from pyro_elbo._torch_internals import is_fake
from pyro_elbo._typing import Guide, Model

Signature = tuple[Any, ...]


class AdamScalars(NamedTuple):
    """An optimizer's ``lr, betas, eps`` as 0-d tensors: inputs of the in-graph Adam update (a
    scheduler's change is a new input, not a new graph)."""

    lr: Tensor
    beta1: Tensor
    beta2: Tensor
    eps: Tensor


class AdamMoments(NamedTuple):
    """``torch.optim.Adam``'s state of each parameter, as the per-parameter in-graph update reads it."""

    exp_avg: list[Tensor]
    exp_avg_sq: list[Tensor]
    #: the step count (float32, as Adam keeps it; one for all parameters)
    step: Tensor


class AdamBuffers(NamedTuple):
    """The flat compiled step's state (:mod:`pyro_elbo.train.flat`): the parameters :math:`\\theta`
    in one vector, the Adam moments :math:`m, v` laid out alike, one step count per parameter and
    the non-finite ledger of :func:`guarded_step`."""

    params: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    steps: Tensor
    ledger: Tensor


class Ledger(NamedTuple):
    """The entries of :func:`guarded_step`'s ledger, in the order the ledger vector holds them."""

    limit: Tensor
    consecutive: Tensor
    skipped: Tensor
    calls: Tensor
    halted_at: Tensor


#: ``(name, shape)`` of each parameter, in the order they are laid out in a flat vector
Layout = tuple[tuple[str, tuple[int, ...]], ...]


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
        self.failed: str | None = None
        #: signatures whose graph runs as CUDA graphs (inductor's cudagraph trees, CUDA only)
        self.cudagraphs: set[Signature] = set()
        self._captured_cudagraphs = False  # the graph _capture just returned runs as CUDA graphs
        self._in_eager_run = False  # _capture is running the step eagerly (its errors are the program's)
        self._last: tuple[Any, Signature] | None = None
        #: the signature and graph of the last call (not for CUDA graphs, whose outputs are copied)
        self._hot: tuple[Signature, Callable[..., Any]] | None = None

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
        quick_key = (_arg_keys(tuple(params.values())), _arg_keys(args), tuple(kwargs.items()))
        if self._last is not None and self._last[0] == quick_key:
            signature = self._last[1]
        else:
            signature = _signature(params, args, kwargs)
            self._last = (quick_key, signature)
        detached = [p.detach() for p in params.values()]
        inputs = [*detached, *adam_inputs]
        return self._run(signature, lambda: self._capture(params, None, args, kwargs, inputs), [*detached, *tensors])

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
        parameter, and the non-finite ledger of :func:`guarded_step`. Returns the loss, ``applied`` (the step was finite and the ledger had
        not halted) and the step's :math:`(\\theta', m', v', t')` (:func:`flat_adam_update`) under
        :math:`x' = \\mathrm{where}(\\text{applied}, x_{\\text{new}}, x)`, then the new ledger, so
        a refused step changes nothing and the host reads no flag to keep it from writing. On CPU
        the graph writes them into the five buffers itself and the list is empty (no output
        buffers, no copy); on CUDA, where a graph that writes its inputs does not run as CUDA
        graphs, it returns them for the caller to copy. ``None``: capture failed (warned).
        """
        if self.failed is not None:
            return None
        tensors = [a for a in args if isinstance(a, Tensor)]
        # the layout itself, not its id: a freed layout's id may be reused by another one
        first = buffers.params
        quick_key = (id(first), first.dtype, first.device, layout, _arg_keys(args), tuple(kwargs.items()))
        if self._last is not None and self._last[0] == quick_key:
            signature = self._last[1]
        else:
            signature = ("flat", _signature(params, args, kwargs))
            self._last = (quick_key, signature)
        state = [*buffers, *scalars]
        inputs = [buffers.params, *tensors, *buffers[1:], *scalars]
        return self._run(signature, lambda: self._capture(params, layout, args, kwargs, state), inputs)

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
                    stacklevel=4,
                )
                return None
            self.graphs[signature] = graph
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
            self.failed = f"compiling the captured graph failed: {type(error).__name__}: {error}"
            warnings.warn(f"compile=True: falling back to the eager path; {self.failed}", RuntimeWarning, stacklevel=4)
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
            return (loss.detach(), finite, *_adam_update(wanted, grads, adam_state, AdamScalars(*moments[2 * n + 1 :])))

        inputs = [args[i] for i in tensor_positions] + list(adam_inputs)
        trainable = [True] if layout is not None else [p.requires_grad for p in params.values()]
        example = [t.detach().clone().requires_grad_(g) for t, g in zip(leading, trainable)]
        skipped: set[str] = set()  # rewrites that failed: the step is traced again without them
        while True:
            with phase("trace"), module_state_kept((model, guide)):
                graph = trace_step(step, example + inputs)
            check_no_baked_parameters(graph, params)
            failed = _rewrite(graph, self.backend, skipped)
            if failed is None:
                break
            skipped.add(failed)
        compiled, self._captured_cudagraphs = compile_graph(graph, leading + inputs, self.backend)
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
                stacklevel=2,
            )
            return name
    return None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


def _internal_failure(error: BaseException) -> str:
    """A failure in torch's machinery (not a :class:`CaptureError`): the error, and the user's line
    when a traceback in its chain reaches one."""
    return f"{type(error).__name__}: {_first_line(error)} ({describe_failure(error)})"


def graph_writes_inputs(device: torch.device) -> bool:
    """Whether the flat step's graph writes its buffers itself (CPU) or returns the new values for
    the caller to copy (CUDA, where inductor runs a graph that mutates its inputs without CUDA
    graphs)."""
    return device.type != "cuda"


class SVICompiledSteps:
    """``loss_and_grads`` through :class:`CompiledLoss` for ``pyro.infer.SVI`` (``Objective(compile=True)``).

    The first step of each model/guide pair runs eagerly and names the parameters; later steps
    call the compiled graph with the param store's unconstrained tensors and accumulate the
    gradients into their ``.grad``. Returns ``None`` (run eagerly) for parameters the param store
    does not hold, or when capture failed."""

    def __init__(self, objective: LossFunction) -> None:
        self.objective = objective
        #: per model/guide pair: the compiled loss (``None``: run eagerly) and its parameter names
        self.programs = ProgramCache()

    def __call__(self, model: Model, guide: Guide, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float | None:
        store = pyro.get_param_store()
        entry: tuple[CompiledLoss | None, list[str]] | None = self.programs.get(model, guide)
        if entry is None:  # the first step runs eagerly and names the parameters
            loss, seen = loss_and_params(lambda: self.objective.differentiable_loss(model, guide, *args, **kwargs))
            if loss.requires_grad:
                loss.backward(retain_graph=bool(self.objective.retain_graph))
            names = list(seen)
            known = all(n in store for n in names)
            self.programs.put(model, guide, (CompiledLoss(self.objective, model, guide) if known else None, names))
            return float(loss.detach())
        compiled, names = entry
        if compiled is None:
            return None
        params = {name: store.get_param(name).unconstrained() for name in names}  # type: ignore[attr-defined]
        out = compiled(params, args, kwargs)
        if out is None:
            return None
        loss, _, grads = out
        for name, param, grad in zip(names, params.values(), grads):
            param.grad = grad if param.grad is None else param.grad + grad
            pyro.param(name)  # let SVI's parameter trace see it
        return float(loss)


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


def all_finite(loss: Tensor, grads: list[Tensor]) -> Tensor:
    """A boolean scalar: the loss and every gradient are finite (no host sync)."""
    return torch.stack([torch.isfinite(loss).all()] + [torch.isfinite(g).all() for g in grads]).all()


def _adam_update(params: list[Tensor], grads: list[Tensor], state: AdamMoments, scalars: AdamScalars) -> list[Tensor]:
    """torch.optim.Adam's update (no weight decay, no amsgrad) of each parameter
    (:func:`adam_moments`), as graph operations: returns the new parameters, first moments,
    second moments and step count."""
    step = state.step + 1
    updates = [
        adam_moments(p, g, m, v, step, *scalars) for p, g, m, v in zip(params, grads, state.exp_avg, state.exp_avg_sq)
    ]
    return [*(p.detach() for p, _, _ in updates), *(m for _, m, _ in updates), *(v for _, _, v in updates), step]


#: the entries of :func:`guarded_step`'s ledger, in order
LEDGER_FIELDS = Ledger._fields


def guarded_step(finite: Tensor, ledger: Tensor) -> tuple[Tensor, Tensor]:
    r"""Whether a step may write, and the non-finite ledger after it: graph operations, so the host
    need not read a flag every step (on CUDA, a synchronization).

    ``ledger`` is an integer vector :math:`(\ell, c, s, n, h)` (:data:`LEDGER_FIELDS`): the limit
    :math:`\ell` of consecutive non-finite steps, the current run :math:`c` of them, the number
    :math:`s` of non-finite steps seen, the number :math:`n` of steps called and the call :math:`h`
    at which the ledger halted (0: not halted). A step is *alive* while :math:`c < \ell`; it applies
    its update iff it is alive and finite:

    .. math::
        a = [c < \ell] \wedge \text{finite}, \quad
        c' = \begin{cases} 0 & \text{alive, finite} \\ c + 1 & \text{alive, not finite} \\
        c & \text{halted} \end{cases}, \quad
        s' = s + [c < \ell \wedge \neg\text{finite}], \quad n' = n + 1, \quad
        h' = \begin{cases} n' & c < \ell \le c' \\ h & \text{else} \end{cases}

    With :math:`\ell = 1` (``on_nonfinite="raise"``) the first non-finite step halts the ledger, so
    it and every later step change nothing until the host reads it (and raises); with
    :math:`\ell = ` ``max_consecutive_skips`` (``"skip"``) non-finite steps are skipped and
    :math:`\ell` of them in a row halt it. Returns :math:`(a, (\ell, c', s', n', h'))`."""
    limit, consecutive, skipped, calls, halted_at = Ledger(*ledger.unbind())
    alive = consecutive < limit
    applied = finite & alive
    refused = alive & ~finite
    new_consecutive = torch.where(
        refused, consecutive + 1, torch.where(alive, torch.zeros_like(consecutive), consecutive)
    )
    new_calls = calls + 1
    new_halted_at = torch.where(refused & (new_consecutive >= limit), new_calls, halted_at)
    new_skipped = skipped + refused.to(skipped.dtype)
    return applied, torch.stack(Ledger(limit, new_consecutive, new_skipped, new_calls, new_halted_at))


def split(flat: Tensor, layout: Layout) -> list[Tensor]:
    """Views of ``flat``, one per ``(name, shape)`` of ``layout``, laid out one after another."""
    views, offset = [], 0
    for _, shape in layout:
        size = math.prod(shape)
        views.append(flat[offset : offset + size].view(shape))
        offset += size
    return views


def flat_adam_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    steps: Tensor,
    lr: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    eps: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""torch.optim.Adam's update (no weight decay, no amsgrad) on flat vectors, as graph operations:

    .. math::
        t' = t + 1, \quad m' = \beta_1 m + (1 - \beta_1) g, \quad v' = \beta_2 v + (1 - \beta_2) g^2, \\
        \theta' = \theta - \frac{\eta}{1 - \beta_1^{t'}} \, \frac{m'}{\sqrt{v'} / \sqrt{1 - \beta_2^{t'}} + \epsilon}

    with one step count per parameter in ``steps`` (all equal; the first one is used). Returns
    :math:`(\theta', m', v', t')`.

    References:
        | Adam: A Method for Stochastic Optimization (Kingma et al., 2015)
        | https://arxiv.org/abs/1412.6980
    """
    new_steps = steps + 1
    return (*adam_moments(param, grad, exp_avg, exp_avg_sq, new_steps[0], lr, beta1, beta2, eps), new_steps)


def adam_moments(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    lr: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    eps: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""One Adam update at step count ``step`` (already incremented, :math:`t'`):

    .. math::
        m' = \beta_1 m + (1 - \beta_1) g, \quad v' = \beta_2 v + (1 - \beta_2) g^2, \quad
        \theta' = \theta - \frac{\eta}{1 - \beta_1^{t'}} \, \frac{m'}{\sqrt{v'} / \sqrt{1 - \beta_2^{t'}} + \epsilon}

    Returns :math:`(\theta', m', v')`; the one formula of both in-graph Adam paths
    (:func:`_adam_update` per parameter, :func:`flat_adam_update` on the flat vector)."""
    bias1 = 1 - beta1**step
    bias2_sqrt = (1 - beta2**step).sqrt()
    m = exp_avg * beta1 + grad * (1 - beta1)
    v = exp_avg_sq * beta2 + grad * grad * (1 - beta2)
    return param - (lr / bias1) * m / (v.sqrt() / bias2_sqrt + eps), m, v


def adam_scalars(
    group: dict[str, Any], cached: tuple[Any, AdamScalars] | None, dtype: torch.dtype, device: torch.device
) -> tuple[Any, AdamScalars]:
    """``lr, beta1, beta2, eps`` of an optimizer's param group as tensors of ``dtype`` on
    ``device``, with the key they were made for: ``cached`` itself while that key still holds, so
    a compiled step gets new scalar tensors only when a scheduler or the user changes them."""
    beta1, beta2 = group["betas"]
    values = (float(group["lr"]), float(beta1), float(beta2), float(group["eps"]))  # a tensor lr may change in place
    key = (values, dtype, device)
    if cached is not None and cached[0] == key:
        return cached
    return key, AdamScalars(*(torch.tensor(v, dtype=dtype, device=device) for v in values))


def plain_adam(opt: torch.optim.Optimizer) -> bool:
    """Adam with one parameter group and no weight decay, amsgrad or maximize: its update can run
    inside the compiled graph (:func:`adam_step`)."""
    if type(opt) is not torch.optim.Adam or len(opt.param_groups) != 1:
        return False
    group = opt.param_groups[0]
    return not (group["weight_decay"] or group["amsgrad"] or group["maximize"] or group.get("differentiable"))


def adam_step(
    compiled: CompiledLoss,
    params: dict[str, Tensor],
    opt: torch.optim.Optimizer,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[float, bool] | None:
    """Loss, gradient and Adam update (:func:`_adam_update`) in one graph call for a
    :func:`plain_adam` optimizer; ``None`` if the graph is not available (run eagerly).

    The optimizer's own state tensors (``exp_avg``, ``exp_avg_sq``, ``step``) are read and written,
    so checkpoints, schedulers (the learning rate is an input) and resume work unchanged. Nothing
    is written when the step is not finite. Returns ``(loss, finite)``."""
    group = opt.param_groups[0]
    tensors = list(params.values())
    states = []
    for p in tensors:
        state = opt.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states.append(state)
    device, dtype = tensors[0].device, tensors[0].dtype
    cached = compiled.adam_scalars = adam_scalars(group, compiled.adam_scalars, dtype, device)
    step = states[0]["step"]  # float32, as torch's Adam keeps it; promoted inside the graph
    moments = AdamMoments([s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], step)
    out = compiled(params, args, kwargs, (moments, cached[1]))
    if out is None:
        return None
    loss, finite, updated = out
    ok = bool(finite)
    if ok:
        n = len(tensors)
        with torch.no_grad():
            torch._foreach_copy_(tensors, updated[:n])
        new_step = updated[3 * n]
        for i, state in enumerate(states):
            state["exp_avg"] = updated[n + i]
            state["exp_avg_sq"] = updated[2 * n + i]
            state["step"] = new_step if i == 0 else new_step.clone()  # never shared: eager Adam steps in place
    return float(loss), ok


def _arg_keys(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The arguments' identities, with each tensor's shape and strides: a tensor given again with
    new contents (``x.data = other``) of another layout is a new signature, not the old graph."""
    return tuple((id(a), a.shape, a.stride()) if isinstance(a, Tensor) else id(a) for a in args)


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
