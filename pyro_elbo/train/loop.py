"""``init``, ``step`` and ``fit``: the training loop Pyro users otherwise write by hand.

:func:`init` builds a :class:`~pyro_elbo.train.TrainState` (parameters discovered, optimizer,
scheduler, compiled step); :func:`~pyro_elbo.train.step` advances it by one optimizer step and
returns ``(state, info)``, the shape of NumPyro's ``SVI.init``/``update`` and BlackJAX's
``init``/``step``. Drive it yourself::

    import pyro_elbo
    from pyro_elbo.train import init, step

    state = init(model, guide, x, objective=pyro_elbo.IWAE(num_particles=8), lr=1e-2)
    for _ in range(1000):
        state, info = step(state)          # or step(state, x_batch) for a minibatch
        if info.step % 100 == 0:
            print(info.step, info.loss)
    params = state.constrained_params()
    state.release_flat_buffers()           # compile=True: parameters out of the shared vector
    torch.save(state.state_dict(), "run.pt")  # later: state.load_state_dict(load_checkpoint("run.pt"))

:func:`fit` is that loop with hooks (:mod:`pyro_elbo.train.hooks`) built from its keyword arguments.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pyro
import torch
from torch import Tensor

from pyro_elbo import distributed
from pyro_elbo._pyro.params import discover_params
from pyro_elbo._typing import Guide, Model
from pyro_elbo.compile import CompiledLoss, plain_adam
from pyro_elbo.objectives import ELBO, Objective
from pyro_elbo.train.autocompile import AutoCompile
from pyro_elbo.train.checkpoint import load_checkpoint
from pyro_elbo.train.data import Data, check_count, to_device
from pyro_elbo.train.hooks import Callback, Callbacks, Checkpointer, EarlyStopping, Hook, Progress, Validation
from pyro_elbo.train.lock import CheckpointLock
from pyro_elbo.train.memory import check_particle_memory
from pyro_elbo.train.result import FitResult
from pyro_elbo.train.signals import StopSignals, stop_error, stop_message
from pyro_elbo.train.state import TrainState
from pyro_elbo.train.step import default_device, step

logger = logging.getLogger("pyro_elbo.train")


class NothingToTrainWarning(UserWarning):
    """The model and guide have no trainable parameters: each step evaluates the loss and updates
    nothing (as Pyro's ``SVI.step`` does)."""


NOTHING_TO_TRAIN = (
    "the model and guide have no trainable parameters (pyro.param, pyro.module, PyroModule): each step "
    "evaluates the loss and updates nothing, as Pyro's SVI.step does. To train, give the guide parameters, "
    "e.g. pyro.param('loc', torch.tensor(0.0)) for a site's location, or an autoguide such as AutoNormal(model)."
)


def init(
    model: Model,
    guide: Guide,
    *args: Any,
    objective: Objective | None = None,
    lr: float = 1e-2,
    optimizer: type[torch.optim.Optimizer] = torch.optim.Adam,
    optimizer_options: dict[str, Any] | None = None,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    clip_norm: float | None = None,
    on_nonfinite: str = "raise",
    max_consecutive_skips: int = 10,
    device: str | torch.device | None = None,
    seed: int | None = None,
    compile: bool = False,
    compile_backend: str = "inductor",
    **kwargs: Any,
) -> TrainState:
    """A fresh :class:`~pyro_elbo.train.TrainState` for ``model`` and ``guide``.

    Runs guide and model once on ``args`` (without using the random stream) to create every
    lazily initialized parameter, moves parameters, modules and ``args`` to ``device``, builds the
    optimizer and scheduler, and checks that ``objective.num_particles`` fits in memory. The
    arguments mean what they mean for :func:`fit`; ``args``/``kwargs`` are also the default inputs
    of :func:`~pyro_elbo.train.step`.

    Raises:
        ValueError: mixed devices, too many particles, bad options.

    Warns:
        NothingToTrainWarning: the model and guide have no trainable parameters; each step then
            evaluates the loss and changes nothing (``compile`` stays eager, and
            ``state.compile_decision`` says why).
        TypeError: ``objective`` is not a pyro_elbo objective.
    """
    if on_nonfinite not in ("raise", "skip"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    objective = ELBO() if objective is None else objective
    if not isinstance(objective, Objective):
        raise TypeError(
            f"objective must be a pyro_elbo objective (e.g. pyro_elbo.IWAE()), got {type(objective).__name__}"
        )
    if seed is not None:
        pyro.set_rng_seed(seed)
    context = distributed.setup(device)
    where = context.device if context.active else (torch.device(device) if device is not None else None)
    for module in (model, guide):
        if isinstance(module, torch.nn.Module) and where is not None:
            module.to(where)
    args = to_device(args, where)
    with default_device(where):
        params = _unique(discover_params(model, guide, *args, **kwargs))
        if not params:
            warnings.warn(NOTHING_TO_TRAIN, NothingToTrainWarning, stacklevel=3)
        if where is not None:
            for param in params.values():
                param.data = param.data.to(where)
        check_devices(params, args, where)
        if context.active:
            distributed.broadcast_params(params, context)
        check_particle_memory(objective, model, guide, args, kwargs, where)
    opt = make_optimizer(optimizer, list(params.values()), lr, optimizer_options)
    sched = scheduler(opt) if scheduler is not None else None
    in_graph_adam = compile and plain_adam(opt) and clip_norm is None and not context.active
    compile_now = compile and bool(params)  # no parameters: no gradient step to compile
    compiled = (
        CompiledLoss(objective, model, guide, backend=compile_backend, adam=in_graph_adam) if compile_now else None
    )
    if context.active:
        distributed.seed_rank(context)
    settings = {
        "lr": lr,
        "optimizer": type(opt).__name__,
        "scheduler": type(sched).__name__ if sched is not None else None,
        "objective": repr(objective),
        "compile": compile,
        "constraints": param_constraints(params),
    }
    state = TrainState(
        model, guide, objective, params, opt, sched, args, kwargs, clip_norm, on_nonfinite,
        max_consecutive_skips, compiled, where, context, settings,
    )  # fmt: skip
    if sched is not None or compile_backend == "eager":  # a scheduler steps only after finite steps
        state.settle_every = 1
    if compile and not params:
        state.compile_decision = (
            f"compile={compile!r} stayed eager: the model and guide have no trainable parameters, so a step only "
            "evaluates the loss and there is no gradient step to compile"
        )
    return state


def fit(
    model: Model,
    guide: Guide,
    *args: Any,
    objective: Objective | None = None,
    num_steps: int | None = None,
    num_epochs: int | None = None,
    lr: float = 1e-2,
    optimizer: type[torch.optim.Optimizer] = torch.optim.Adam,
    optimizer_options: dict[str, Any] | None = None,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    clip_norm: float | None = None,
    device: str | torch.device | None = None,
    process_group_timeout: float | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
    on_nonfinite: str = "raise",
    max_consecutive_skips: int = 10,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
    patience: int | None = None,
    min_delta: float = 0.0,
    validation: Any = None,
    validate_every: int = 100,
    seed: int | None = None,
    compile: bool | str = False,
    compile_backend: str = "inductor",
    hooks: Sequence[Hook] = (),
    **kwargs: Any,
) -> FitResult:
    """Train a guide (and the model's parameters) by stochastic variational inference.

    Data come either as tensors in ``*args`` (the full batch every step) or as a single
    ``torch.utils.data.DataLoader`` in place of the args: each batch (a tensor or a tuple of
    tensors) becomes the model's positional args, for ``num_epochs`` epochs. Models scale
    minibatches as Pyro users already do, with ``pyro.plate(..., subsample=...)`` or a
    ``subsample_size``. ``fit`` is :func:`init`, then :func:`~pyro_elbo.train.step` in a loop
    with hooks; drive those yourself for a custom loop.

    Args:
        model, guide: the Pyro model and guide.
        *args: the model's arguments, or one ``DataLoader``. A ``DataLoader`` over an
            ``IterableDataset`` without ``len()`` runs ``num_steps`` steps (restarting the stream
            when it ends); under ``torch.distributed`` a loader over an ``IterableDataset`` is each
            rank's own stream (it must yield that rank's part) and needs ``num_steps``. An
            iterator, a generator or a list of batches is refused: pass the ``DataLoader``.
        objective: a :class:`~pyro_elbo.Objective` (default ``ELBO()``). Its ``num_particles`` is
            checked against the memory available before the first step.
        num_steps: optimizer steps (default 1000). With a ``DataLoader`` and ``num_epochs``, a cap on
            the total: ``min(num_steps, num_epochs * len(loader))``; ``num_epochs`` alone runs every
            epoch.
        num_epochs: passes over a ``DataLoader``.
        lr: learning rate.
        optimizer: any ``torch.optim.Optimizer`` class (default Adam); ``optimizer_options`` go to it.
        scheduler: a function ``optimizer -> lr_scheduler`` (stepped once per optimizer step).
        clip_norm: clip the global gradient norm to this value.
        device: move parameters and data there once; ``None`` keeps them where they are (and
            refuses mixed placement).
        process_group_timeout: under ``torchrun``, when ``fit`` creates the process group: how
            many seconds a collective call (the gradients' all-reduce) waits for a stalled rank
            before it raises, instead of torch's default (30 minutes for Gloo, 10 for NCCL). A
            process group created before ``fit`` keeps its own timeout.
        checkpoint: path of a checkpoint written atomically every ``checkpoint_every`` steps and at
            the end (its location is checked for writability before the first step); with
            ``resume=True`` training continues from it when it exists.
        resume: continue the run saved in ``checkpoint``. A resume continues *that* run, so it
            refuses, naming each difference and changing nothing, when this call's ``lr``,
            ``optimizer``, optimizer options, ``scheduler`` (its presence and class) or
            ``objective`` (its repr, e.g. ``IWAE(num_particles=8)``), ``compile`` or a
            ``pyro.param``'s constraint (the saved unconstrained value would mean another
            value) differ from the checkpoint's, and when the parameters' names or shapes, the world size or the
            checkpoint's fields do not match. A refused resume leaves parameters, param store,
            optimizer, random state and the file exactly as they were. To continue from a
            checkpoint with new settings, use :func:`init`, ``state.load_state_dict`` with the
            old settings and change them on ``state.optimizer``. Checkpoints of format
            ``pyro_elbo.checkpoint/1`` load; newer formats are refused by version. While ``fit``
            runs, ``checkpoint + ".lock"`` names it as the path's writer: a second run on the same
            path (a script launched twice) is refused naming the first one's pid and host, and a
            lock left by a process that died is taken over with a warning
            (:mod:`~pyro_elbo.train.lock`).
        on_nonfinite: ``"raise"`` (default) or ``"skip"`` a step whose loss or gradient is not
            finite; parameters and optimizer state are left exactly as before the step either way.
        max_consecutive_skips: with ``"skip"``, raise after this many non-finite steps in a row.
        progress: show a tqdm bar with the running loss, steps/s and ETA (rank 0 only).
        callbacks: functions ``(step, loss)`` called after every step; returning ``False`` stops.
        patience, min_delta: stop when the running-mean loss has not improved by ``min_delta`` for
            ``patience`` steps.
        validation: args (a tuple) or a ``DataLoader`` on which the loss is evaluated every
            ``validate_every`` steps.
        seed: seeds torch, CUDA, Python and NumPy; same seed, same device -> identical runs.
        compile: capture the whole step (particles, guide, model, objective, gradients) as one graph
            compiled with ``compile_backend`` (see :mod:`pyro_elbo.compile`). The first step pays
            the compilation (seconds; reported in ``FitResult.compile_seconds``), so it pays off on
            long runs. Models that cannot be captured fall back to eager with one warning.
            ``"auto"`` times a few eager steps and compiles only when that can pay off within the
            requested steps, then keeps the compiled step only if it is faster
            (:mod:`pyro_elbo.train.autocompile`); ``FitResult.compile_decision`` says which path
            ran and why, and the progress bar writes it.
        hooks: more :class:`~pyro_elbo.train.hooks.Hook` objects, called after the built-in ones.
        **kwargs: keyword arguments of model and guide.

    SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) stop the run after the step they arrive
    in, every process after the same step: the checkpoint is written at that step, one line with
    the step and how to resume is logged (logger ``pyro_elbo.train``, shown on stderr when logging
    is not configured), a handler the program installed for the signal is called, and ``fit`` raises
    :class:`~pyro_elbo.train.signals.TrainingTerminated` (a ``SystemExit`` with status 143) for
    SIGTERM and ``KeyboardInterrupt`` for SIGINT; a resume then continues bit-identically. The
    previous signal handlers are restored when ``fit`` ends (:mod:`~pyro_elbo.train.signals`).

    Returns:
        A :class:`FitResult`.

    Raises:
        NonFiniteLossError: a non-finite step with ``on_nonfinite="raise"`` (names the site).
        ValueError: a refused resume (see ``resume``), a corrupt file, an unwritable checkpoint
            location, mixed devices, too many particles for the memory, bad options.
    """
    check_count("num_steps", num_steps, 0)
    check_count("num_epochs", num_epochs, 1)
    check_count("checkpoint_every", checkpoint_every, 1)
    check_count("validate_every", validate_every, 1)
    if compile not in (True, False, "auto"):
        raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
    if seed is not None:
        pyro.set_rng_seed(seed)
    if process_group_timeout is not None and not (
        isinstance(process_group_timeout, (int, float)) and 0 < process_group_timeout < math.inf
    ):
        raise ValueError(f"process_group_timeout must be a number of seconds > 0, got {process_group_timeout!r}")
    context = distributed.setup(device, process_group_timeout)
    where = context.device if context.active else (torch.device(device) if device is not None else None)
    with contextlib.ExitStack() as stack:
        if checkpoint is not None:
            lock_checkpoint(stack, checkpoint, context)
        data = Data(args, num_steps, num_epochs, where, context)
        with default_device(where):
            state = init(
                model, guide, *data.peek(), objective=objective, lr=lr, optimizer=optimizer,
                optimizer_options=optimizer_options, scheduler=scheduler, clip_norm=clip_norm,
                on_nonfinite=on_nonfinite, max_consecutive_skips=max_consecutive_skips, device=device,
                compile=bool(compile), compile_backend=compile_backend, **kwargs,
            )  # fmt: skip
            state.settings["compile"] = compile
            if checkpoint is not None and resume and os.path.exists(checkpoint):
                state.load_state_dict(load_checkpoint(checkpoint, map_location=where))
                state.resumed_from_step = state.step
                logger.info("resumed from step %d of %s", state.step, checkpoint)
            if compile and state.compile_decision is not None and "stayed eager" in state.compile_decision:
                state.compile_decision = state.compile_decision.replace("compile=True", f"compile={compile!r}")
            autocompile = compile == "auto" and state.compiled is not None
            built: list[Hook] = [AutoCompile(data.total_steps)] if autocompile else []
            built += [Progress(data.total_steps)] if progress else []
            built += [Validation(validation, validate_every)] if validation is not None else []
            built += [Checkpointer(checkpoint, checkpoint_every)] if checkpoint is not None else []
            built += [Callbacks(callbacks)] if callbacks else []
            built += [EarlyStopping(patience, min_delta)] if patience is not None else []
            try:
                stop_reason = run(state, data, [*built, *hooks], stack.enter_context(StopSignals()))
            finally:  # parameters saved one module at a time must not carry the shared vector
                state.release_flat_buffers()
    return state.result(stop_reason)


def lock_checkpoint(stack: contextlib.ExitStack, path: str | os.PathLike[str], context: distributed.Context) -> None:
    """The main process takes the checkpoint path's lock (:mod:`~pyro_elbo.train.lock`) until the
    stack closes; every process raises if it is refused."""
    error = None
    if context.is_main:
        try:
            stack.enter_context(CheckpointLock(path))
        except ValueError as refused:
            error = refused
    distributed.agree_or_raise(context, error)


def run(state: TrainState, data: Data, hooks: Sequence[Hook], signals: StopSignals | None = None) -> str:
    """Step through ``data`` from ``state.position``, calling the hooks; returns the stop reason.

    With ``signals``, a SIGTERM or SIGINT stops the run after the step it arrived in (the same
    step on every rank): the hooks' ``on_interrupt`` run (the checkpoint is written), one line is
    logged, the program's own handler of the signal (if any) is called, and :class:`~pyro_elbo.train.signals.TrainingTerminated` or
    :class:`~pyro_elbo.train.signals.TrainingInterrupted` is raised."""
    stop_reason = "completed"
    stopped_by = None
    try:
        for hook in hooks:
            hook.on_start(state)
        for batch in data.batches(state.position):
            state, info = step(state, *batch)
            reason = next((r for r in (hook.on_step(state, info) for hook in hooks) if r is not None), None)
            stopped_by = signals.agreed(state.context) if signals is not None else None
            if stopped_by is not None:
                break
            if reason is not None:
                stop_reason = reason
                break
        state.settle()  # a step refused since the last read raises now, before the last checkpoint
        if stopped_by is not None:
            for hook in hooks:
                hook.on_interrupt(state)
    finally:
        for hook in hooks:
            hook.close()
    if stopped_by is not None:
        path = next((str(h.path) for h in hooks if isinstance(h, Checkpointer)), None)
        message = stop_message(stopped_by, state.step, data.total_steps, path, written=path is not None)
        if state.context.is_main:
            logger.warning(message)
        if signals is not None:
            signals.forward(stopped_by)
        raise stop_error(stopped_by, message, state.step, path)
    for hook in hooks:
        hook.on_end(state)
    distributed.barrier(state.context)
    return stop_reason


def param_constraints(params: dict[str, Tensor]) -> dict[str, str]:
    """Each param-store parameter's constraint (its repr, e.g. ``GreaterThan(lower_bound=0.0)``),
    by name: a resume reads the saved unconstrained values through it, so it must not change."""
    saved = pyro.get_param_store().get_state()["constraints"]
    return {name: repr(saved[name]) for name in params if name in saved}


def _unique(params: dict[str, Tensor]) -> dict[str, Tensor]:
    """One entry per tensor: a guide may read one leaf under two names (an optimizer refuses
    duplicate parameters); the first name is kept."""
    seen: set[int] = set()
    unique = {}
    for name, param in params.items():
        if id(param) not in seen:
            seen.add(id(param))
            unique[name] = param
    return unique


def make_optimizer(
    optimizer: type[torch.optim.Optimizer], params: list[Tensor], lr: float, options: dict[str, Any] | None
) -> torch.optim.Optimizer:
    """Adam/AdamW use their fused kernel (one call per step for all parameters) unless told
    otherwise; it computes the same update as the default loop up to rounding."""
    options = dict(options or {})
    build: Callable[..., torch.optim.Optimizer] = optimizer
    if not params:  # nothing to train: an optimizer of one empty group (a step changes nothing)
        return build([{"params": []}], lr=lr, **options)
    if optimizer in (torch.optim.Adam, torch.optim.AdamW) and "fused" not in options and "foreach" not in options:
        try:
            return build(params, lr=lr, fused=True, **options)
        except (RuntimeError, ValueError, TypeError):
            pass
    return build(params, lr=lr, **options)


def check_devices(params: dict[str, Tensor], args: tuple[Any, ...], device: torch.device | None) -> None:
    """Every parameter and data tensor on ``device`` (or on one device, if ``None``)."""
    tensors = [(f"parameter '{n}'", p) for n, p in params.items()]
    tensors += [(f"data argument {i}", a) for i, a in enumerate(args) if isinstance(a, Tensor)]
    if not tensors:
        return
    reference_name, reference = tensors[0]
    expected = device if device is not None else reference.device
    for name, tensor in tensors:
        if tensor.device.type != expected.type or (
            expected.index is not None and tensor.device.index not in (None, expected.index)
        ):
            where = f"device={expected}" if device is not None else f"{reference_name} on {reference.device}"
            raise ValueError(
                f"{name} is on {tensor.device} but {where}; pass device=... to fit to move "
                "parameters and data to one device."
            )
