"""``fit``: the training loop Pyro users otherwise write by hand.

Devices, minibatches (tensors or a ``DataLoader``), learning-rate schedules, gradient clipping,
checkpoints that survive ``kill -9`` and resume bit-identically, non-finite steps refused or skipped
with the offending site named, progress, callbacks, early stopping and validation.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from torch import Tensor

from pyro_elbo import distributed
from pyro_elbo._pyro.log_weights import log_weights
from pyro_elbo._pyro.params import constrained_value, discover_params, loss_and_params
from pyro_elbo._random import forked_rng, rng_state, set_rng_state, set_torch_rng_state, torch_rng_state
from pyro_elbo._typing import Guide, Model
from pyro_elbo.compiled import CompiledLoss, all_finite
from pyro_elbo.objectives import ELBO, Objective

CHECKPOINT_FORMAT = "pyro_elbo.checkpoint/1"

Callback = Callable[[int, float], Any]


class NonFiniteLossError(FloatingPointError):
    """A step produced a NaN/inf loss or gradient; parameters were left as they were."""


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        history: the loss of every step taken (skipped steps included, as NaN/inf).
        step_seconds: wall-clock seconds of every step (the GPU synchronized).
        num_skipped: steps skipped as non-finite (``on_nonfinite="skip"``).
        validation_history: ``(step, loss)`` every ``validate_every`` steps.
        stop_reason: ``"completed"``, ``"early_stopping"`` or ``"callback"``.
        params: parameter name -> constrained value (detached) at the end.
        objective: the objective used.
    """

    history: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    num_skipped: int = 0
    validation_history: list[tuple[int, float]] = field(default_factory=list)
    stop_reason: str = "completed"
    params: dict[str, Tensor] = field(default_factory=dict)
    objective: Objective | None = None
    resumed_from_step: int | None = None
    compile_seconds: float | None = None

    @property
    def num_steps(self) -> int:
        return len(self.history)

    def plot(self, ax: Any = None) -> Any:
        """The loss curve (and validation loss). Returns the figure."""
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5)) if ax is None else (ax.figure, ax)
        losses = np.asarray(self.history, dtype=float)
        ax.plot(losses, lw=0.6, alpha=0.5, label="loss")
        window = max(1, len(losses) // 50)
        if window > 1:
            kernel = np.ones(window) / window
            ax.plot(np.arange(window - 1, len(losses)), np.convolve(losses, kernel, "valid"), label=f"mean of {window}")
        if self.validation_history:
            steps, values = zip(*self.validation_history)
            ax.plot(steps, values, "o-", ms=3, label="validation")
        name = type(self.objective).__name__ if self.objective is not None else "objective"
        ax.set_xlabel("step")
        ax.set_ylabel(f"{name} loss")
        finite = losses[np.isfinite(losses)]
        if finite.size and finite.min() > 0 and finite.max() / max(finite.min(), 1e-300) > 100:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig


def fit(
    model: Model,
    guide: Guide,
    *args: Any,
    objective: Objective | None = None,
    num_steps: int = 1000,
    num_epochs: int | None = None,
    lr: float = 1e-2,
    optimizer: type[torch.optim.Optimizer] = torch.optim.Adam,
    optimizer_options: dict[str, Any] | None = None,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    clip_norm: float | None = None,
    device: str | torch.device | None = None,
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
    compile: bool = False,
    compile_backend: str = "inductor",
    **kwargs: Any,
) -> FitResult:
    """Train a guide (and the model's parameters) by stochastic variational inference.

    Data come either as tensors in ``*args`` (the full batch every step) or as a single
    ``torch.utils.data.DataLoader`` in place of the args: each batch (a tensor or a tuple of
    tensors) becomes the model's positional args, for ``num_epochs`` epochs. Models scale
    minibatches as Pyro users already do, with ``pyro.plate(..., subsample=...)`` or a
    ``subsample_size``.

    Args:
        model, guide: the Pyro model and guide.
        *args: the model's arguments, or one ``DataLoader``.
        objective: a :class:`~pyro_elbo.Objective` (default ``ELBO()``).
        num_steps: optimizer steps (with a ``DataLoader``: a cap on the total, if ``num_epochs``).
        num_epochs: passes over a ``DataLoader``.
        lr: learning rate.
        optimizer: any ``torch.optim.Optimizer`` class (default Adam); ``optimizer_options`` go to it.
        scheduler: a function ``optimizer -> lr_scheduler`` (stepped once per optimizer step).
        clip_norm: clip the global gradient norm to this value.
        device: move parameters and data there once; ``None`` keeps them where they are (and
            refuses mixed placement).
        checkpoint: path of a checkpoint written atomically every ``checkpoint_every`` steps and at
            the end; with ``resume=True`` training continues from it when it exists.
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
            compiled with ``compile_backend`` (see :mod:`pyro_elbo.compiled`). The first step pays
            the compilation (seconds; reported in ``FitResult.compile_seconds``), so it pays off on
            long runs. Models that cannot be captured fall back to eager with one warning.
        **kwargs: keyword arguments of model and guide.

    Returns:
        A :class:`FitResult`.

    Raises:
        NonFiniteLossError: a non-finite step with ``on_nonfinite="raise"`` (names the site).
        ValueError: a checkpoint from another model or a corrupt file, mixed devices, bad options.
    """
    if on_nonfinite not in ("raise", "skip"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
    if num_steps < 0 or (num_epochs is not None and num_epochs < 1):
        raise ValueError("num_steps must be >= 0 and num_epochs >= 1")
    if checkpoint_every < 1 or validate_every < 1:
        raise ValueError("checkpoint_every and validate_every must be >= 1")
    objective = ELBO() if objective is None else objective
    if not isinstance(objective, Objective):
        raise TypeError(f"objective must be a pyro_elbo objective (e.g. pyro_elbo.IWAE()), got {type(objective).__name__}")
    if seed is not None:
        pyro.set_rng_seed(seed)
    dist_ctx = distributed.setup(device)
    device = dist_ctx.device if dist_ctx.active else (torch.device(device) if device is not None else None)

    data = _Data(args, num_steps, num_epochs, device, dist_ctx)
    for module in (model, guide):
        if isinstance(module, torch.nn.Module) and device is not None:
            module.to(device)
    with _default_device(device):
        first_args = data.peek()
        params = discover_params(model, guide, *first_args, **kwargs)
        if not params:
            raise ValueError("the model and guide have no trainable parameters (pyro.param, pyro.module, PyroModule)")
        if device is not None:
            for param in params.values():
                param.data = param.data.to(device)
        _check_devices(params, first_args, device)
        if dist_ctx.active:
            distributed.broadcast_params(params, dist_ctx)
        opt = _make_optimizer(optimizer, list(params.values()), lr, optimizer_options)
        sched = scheduler(opt) if scheduler is not None else None
        result = FitResult(objective=objective)
        state = _LoopState()
        ckpt_path = Path(checkpoint) if checkpoint is not None else None
        if ckpt_path is not None and resume and ckpt_path.exists():
            restored = load_checkpoint(ckpt_path, map_location=device)
            _restore(restored, params, opt, sched, objective, result, state, dist_ctx)
            result.resumed_from_step = state.step
        elif dist_ctx.active:
            distributed.seed_rank(dist_ctx)
        bar = _progress_bar(progress and dist_ctx.is_main, data.total_steps, state.step)
        plateau = _Plateau(patience, min_delta) if patience is not None else None
        consecutive_skips = 0
        in_graph_adam = compile and _plain_adam(opt) and clip_norm is None and not dist_ctx.active
        compiled = CompiledLoss(objective, model, guide, backend=compile_backend, adam=in_graph_adam) if compile else None
        try:
            for step_args in data.batches(state):
                # the pre-step random state lets a refused step replay its draws and name the site
                rng_before = torch_rng_state() if on_nonfinite == "raise" else None
                start = time.perf_counter()
                loss_value, ok = _step(
                    objective, model, guide, step_args, kwargs, params, opt, clip_norm, dist_ctx, compiled
                )
                if compiled is not None and result.compile_seconds is None and compiled.capture_seconds:
                    result.compile_seconds = sum(compiled.capture_seconds.values())
                    if bar is not None:
                        bar.write(f"compiled the step in {result.compile_seconds:.1f} s")
                if not ok:
                    if on_nonfinite == "raise":
                        culprit = _find_nonfinite_site(objective, model, guide, step_args, kwargs, rng_before)
                        raise NonFiniteLossError(
                            f"step {state.step}: the loss or its gradient is not finite ({loss_value}){culprit}; "
                            "parameters and optimizer state were left as before this step. Pass "
                            "on_nonfinite='skip' to skip such steps."
                        )
                    consecutive_skips += 1
                    result.num_skipped += 1
                    if consecutive_skips >= max_consecutive_skips:
                        raise NonFiniteLossError(
                            f"{consecutive_skips} consecutive non-finite steps (last at step {state.step}); "
                            "stopping. Lower the learning rate or check the data."
                        )
                else:
                    consecutive_skips = 0
                    if sched is not None:
                        sched.step()
                if device is not None and device.type == "cuda":
                    torch.cuda.synchronize(device)
                result.step_seconds.append(time.perf_counter() - start)
                result.history.append(loss_value)
                state.step += 1
                if bar is not None:
                    bar.update(1)
                    if state.step % 10 == 0 or state.step == data.total_steps:
                        bar.set_postfix(loss=f"{loss_value:.4g}", refresh=False)
                if validation is not None and state.step % validate_every == 0:
                    result.validation_history.append(
                        (state.step, _validation_loss(objective, model, guide, validation, kwargs, device))
                    )
                if ckpt_path is not None and state.step % checkpoint_every == 0:
                    _checkpoint(ckpt_path, params, opt, sched, objective, result, state, dist_ctx)
                stop = [cb(state.step, loss_value) for cb in callbacks]
                if any(s is False for s in stop):
                    result.stop_reason = "callback"
                    break
                if plateau is not None and ok and plateau.update(loss_value):
                    result.stop_reason = "early_stopping"
                    break
        finally:
            if bar is not None:
                bar.close()
        if ckpt_path is not None and state.step % checkpoint_every != 0:
            _checkpoint(ckpt_path, params, opt, sched, objective, result, state, dist_ctx)
        if dist_ctx.active:
            distributed.barrier(dist_ctx)
    result.params = {name: constrained_value(name, p).detach().clone() for name, p in params.items()}
    return result


# --------------------------------------------------------------------------------------------
# one step


def _step(
    objective: Objective,
    model: Model,
    guide: Guide,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    params: dict[str, Tensor],
    opt: torch.optim.Optimizer,
    clip_norm: float | None,
    dist_ctx: distributed.Context,
    compiled: CompiledLoss | None = None,
) -> tuple[float, bool]:
    """One optimizer step; returns (loss, finite). Nothing is updated unless everything is finite."""
    if compiled is not None and compiled.adam:
        done = _compiled_adam_step(compiled, params, opt, args, kwargs)
        if done is not None:
            return done
    out = compiled(params, args, kwargs) if compiled is not None and not compiled.adam else None
    finite: Tensor | None = None
    if out is not None:
        loss, finite, param_grads = out
        for param, grad in zip(params.values(), param_grads):
            param.grad = grad
    else:
        loss, seen = loss_and_params(lambda: objective.differentiable_loss(model, guide, *args, **kwargs))
        _add_new_params(seen, params, opt)
        opt.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
    if dist_ctx.active:
        distributed.average_gradients(list(params.values()), dist_ctx)
        loss = distributed.average_scalar(loss.detach(), dist_ctx)
        finite = None
    if finite is None:
        finite = all_finite(loss.detach(), [p.grad for p in params.values() if p.grad is not None])
    loss_value = float(loss.detach())
    if not bool(finite):
        opt.zero_grad(set_to_none=True)
        return loss_value, False
    if clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(list(params.values()), clip_norm)
    opt.step()
    return loss_value, True


def _plain_adam(opt: torch.optim.Optimizer) -> bool:
    """Adam with one parameter group and no weight decay, amsgrad or maximize: its update can run
    inside the compiled graph."""
    if type(opt) is not torch.optim.Adam or len(opt.param_groups) != 1:
        return False
    group = opt.param_groups[0]
    return not (group["weight_decay"] or group["amsgrad"] or group["maximize"] or group.get("differentiable"))


def _compiled_adam_step(
    compiled: CompiledLoss,
    params: dict[str, Tensor],
    opt: torch.optim.Optimizer,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[float, bool] | None:
    """Loss, gradient and Adam update in one graph call; the optimizer's own state tensors are
    read and written, so checkpoints, schedulers (the learning rate is an input) and resume work
    unchanged. Nothing is written when the step is not finite."""
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
    beta1, beta2 = group["betas"]
    values = (float(group["lr"]), float(beta1), float(beta2), float(group["eps"]))
    cached = compiled.adam_scalars
    if cached is None or cached[0] != (values, dtype, device):  # new tensors only when lr etc. change
        cached = ((values, dtype, device), [torch.tensor(v, dtype=dtype, device=device) for v in values])
        compiled.adam_scalars = cached
    scalars = cached[1]
    step = states[0]["step"]  # float32, as torch's Adam keeps it; promoted inside the graph
    adam_inputs = [s["exp_avg"] for s in states] + [s["exp_avg_sq"] for s in states] + [step, *scalars]
    out = compiled(params, args, kwargs, adam_inputs)
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


def _make_optimizer(
    optimizer: type[torch.optim.Optimizer], params: list[Tensor], lr: float, options: dict[str, Any] | None
) -> torch.optim.Optimizer:
    """Adam/AdamW use their fused kernel (one call per step for all parameters) unless told
    otherwise; it computes the same update as the default loop up to rounding."""
    options = dict(options or {})
    if optimizer in (torch.optim.Adam, torch.optim.AdamW) and "fused" not in options and "foreach" not in options:
        try:
            return optimizer(params, lr=lr, fused=True, **options)
        except (RuntimeError, ValueError, TypeError):
            pass
    return optimizer(params, lr=lr, **options)


def _add_new_params(seen: dict[str, Tensor], params: dict[str, Tensor], opt: torch.optim.Optimizer) -> None:
    new = {name: leaf for name, leaf in seen.items() if name not in params}
    if new:
        params.update(new)
        opt.add_param_group({"params": list(new.values())})


def _check_devices(params: dict[str, Tensor], args: tuple[Any, ...], device: torch.device | None) -> None:
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


@contextlib.contextmanager
def _default_device(device: torch.device | None) -> Iterator[None]:
    """On an accelerator, tensors the model creates (plate subsample indices, constants) default
    to it. Not on CPU, where a default-device context would only add overhead."""
    if device is None or device.type == "cpu":
        yield
        return
    previous = torch.get_default_device()
    torch.set_default_device(device)
    try:
        yield
    finally:
        torch.set_default_device(previous)


def _find_nonfinite_site(
    objective: Objective,
    model: Model,
    guide: Guide,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    rng: dict[str, Any],
) -> str:
    """Replay the failed step's draws and name the first site whose log-density is not finite."""
    saved = torch_rng_state()
    try:
        set_torch_rng_state(rng)
        with torch.no_grad():
            lw = log_weights(
                model,
                guide,
                *args,
                num_particles=objective.num_particles,
                max_plate_nesting=objective.plate_nesting(model, guide, args, kwargs),
                vectorize_particles=objective.vectorize_particles,
                need={"per_site"},
                **kwargs,
            )
    except Exception as error:  # the replay itself failed: report that
        return f" (replaying the step raised {type(error).__name__}: {error})"
    finally:
        set_torch_rng_state(saved)
    for role, sites in (("model", lw.site_log_p), ("guide", lw.site_log_q)):
        for name, value in sites.items():
            if not torch.isfinite(value).all():
                return f"; the {role} site '{name}' has a non-finite log-density"
    return "; every site's log-density is finite, so the gradient overflowed"


def _validation_loss(
    objective: Objective, model: Model, guide: Guide, validation: Any, kwargs: dict[str, Any], device: torch.device | None
) -> float:
    batches = validation if isinstance(validation, torch.utils.data.DataLoader) else [validation]
    total = 0.0
    with forked_rng():
        for batch in batches:
            total += objective.loss(model, guide, *_to_device(_as_args(batch), device), **kwargs)
    return total


class _Plateau:
    """Early stopping: no improvement of the running mean by ``min_delta`` in ``patience`` steps."""

    def __init__(self, patience: int, min_delta: float) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience, self.min_delta = patience, min_delta
        self.window = max(10, patience // 10)
        self.recent: list[float] = []
        self.best = math.inf
        self.since_best = 0

    def update(self, loss: float) -> bool:
        self.recent.append(loss)
        if len(self.recent) > self.window:
            self.recent.pop(0)
        mean = sum(self.recent) / len(self.recent)
        if mean < self.best - self.min_delta:
            self.best, self.since_best = mean, 0
        else:
            self.since_best += 1
        return self.since_best >= self.patience


def _progress_bar(enabled: bool, total: int, initial: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="fit", unit="step", dynamic_ncols=True, mininterval=0.25)


# --------------------------------------------------------------------------------------------
# data


def _as_args(batch: Any) -> tuple[Any, ...]:
    if isinstance(batch, (tuple, list)):
        return tuple(batch)
    return (batch,)


def _to_device(args: tuple[Any, ...], device: torch.device | None) -> tuple[Any, ...]:
    if device is None:
        return args
    return tuple(a.to(device, non_blocking=True) if isinstance(a, Tensor) else a for a in args)


@dataclass
class _LoopState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    epoch_rng: dict[str, Any] | None = None


class _Data:
    """Full-batch args or a DataLoader, with resumable iteration order."""

    def __init__(
        self,
        args: tuple[Any, ...],
        num_steps: int,
        num_epochs: int | None,
        device: torch.device | None,
        dist_ctx: distributed.Context,
    ) -> None:
        loaders = [a for a in args if isinstance(a, torch.utils.data.DataLoader)]
        self.loader: torch.utils.data.DataLoader | None = None
        if loaders:
            if len(args) != 1:
                raise ValueError("pass a DataLoader as the only positional argument after model and guide")
            self.loader = distributed.shard_loader(loaders[0], dist_ctx) if dist_ctx.active else loaders[0]
            self.num_epochs = num_epochs if num_epochs is not None else 1
            per_epoch = len(self.loader)
            self.total_steps = self.num_epochs * per_epoch
            if num_epochs is None and num_steps:
                self.num_epochs = math.ceil(num_steps / per_epoch)
                self.total_steps = num_steps
        else:
            if num_epochs is not None:
                raise ValueError("num_epochs needs a DataLoader; with tensors use num_steps")
            self.num_epochs = 0
            self.total_steps = num_steps
        self.device = device
        self.args = _to_device(args, device) if self.loader is None else ()

    def peek(self) -> tuple[Any, ...]:
        if self.loader is None:
            return self.args
        with forked_rng():
            return _to_device(_as_args(next(iter(self.loader))), self.device)

    def batches(self, state: _LoopState) -> Iterable[tuple[Any, ...]]:
        if self.loader is None:
            while state.step < self.total_steps:
                yield self.args
            return
        while state.step < self.total_steps and state.epoch < self.num_epochs:
            resuming = state.batch_in_epoch > 0 and state.epoch_rng is not None
            if resuming:
                current = rng_state()
                set_rng_state(state.epoch_rng)  # type: ignore[arg-type]
            else:
                state.epoch_rng = rng_state()
            distributed.set_epoch(self.loader, state.epoch)
            iterator = iter(self.loader)
            if resuming:
                for _ in range(state.batch_in_epoch):
                    next(iterator)
                set_rng_state(current)
            for batch in iterator:
                if state.step >= self.total_steps:
                    return
                state.batch_in_epoch += 1
                yield _to_device(_as_args(batch), self.device)
            state.epoch += 1
            state.batch_in_epoch = 0
            state.epoch_rng = None


# --------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write ``state`` atomically: a temporary file in the same folder, flushed to disk, then
    renamed over ``path``. A crash (even ``kill -9``) mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = None) -> dict[str, Any]:
    """Read a checkpoint written by :func:`fit` (``weights_only``: no code is unpickled).

    Raises:
        ValueError: the file is corrupt, truncated or not a pyro_elbo checkpoint.
    """
    try:
        state = torch.load(Path(path), map_location=map_location if map_location is not None else "cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"checkpoint {str(path)!r} is corrupt or unreadable ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not a pyro_elbo checkpoint")
    return state


def _checkpoint(path: Path, *state: Any) -> None:
    """Snapshot on every rank (the random states are gathered collectively); rank 0 writes."""
    snapshot = _snapshot(*state)
    if state[-1].is_main:
        save_checkpoint(path, snapshot)


def _snapshot(
    params: dict[str, Tensor],
    opt: torch.optim.Optimizer,
    sched: Any,
    objective: Objective,
    result: FitResult,
    state: _LoopState,
    dist_ctx: distributed.Context,
) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "objective": repr(objective),
        "objective_state": objective.state_dict(),
        "param_names": list(params),
        "params": {name: p.detach().clone() for name, p in params.items()},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict() if sched is not None else None,
        "step": state.step,
        "epoch": state.epoch,
        "batch_in_epoch": state.batch_in_epoch,
        "epoch_rng": state.epoch_rng,
        "history": list(result.history),
        "step_seconds": list(result.step_seconds),
        "num_skipped": result.num_skipped,
        "validation_history": [list(v) for v in result.validation_history],
        "rng": rng_state(),
        "world_size": dist_ctx.world_size,
        "rank_rng": distributed.gather_rng_states(dist_ctx, rng_state) if dist_ctx.active else None,
    }


def _restore(
    ckpt: dict[str, Any],
    params: dict[str, Tensor],
    opt: torch.optim.Optimizer,
    sched: Any,
    objective: Objective,
    result: FitResult,
    state: _LoopState,
    dist_ctx: distributed.Context,
) -> None:
    saved_shapes = {n: tuple(t.shape) for n, t in ckpt["params"].items()}
    current_shapes = {n: tuple(p.shape) for n, p in params.items()}
    if saved_shapes != current_shapes:
        missing = sorted(set(current_shapes) - set(saved_shapes))
        extra = sorted(set(saved_shapes) - set(current_shapes))
        differ = sorted(n for n in set(saved_shapes) & set(current_shapes) if saved_shapes[n] != current_shapes[n])
        raise ValueError(
            "the checkpoint belongs to a different model/guide: "
            + "; ".join(
                part
                for part in (
                    f"parameters not in the checkpoint: {missing}" if missing else "",
                    f"parameters only in the checkpoint: {extra}" if extra else "",
                    f"shapes differ for {differ}" if differ else "",
                )
                if part
            )
            + ". Nothing was loaded or overwritten; use another checkpoint path or resume=False."
        )
    if ckpt["world_size"] != dist_ctx.world_size:
        raise ValueError(
            f"the checkpoint was written by {ckpt['world_size']} process(es) but {dist_ctx.world_size} are "
            "running; resume with the same world size."
        )
    order = ckpt["param_names"]
    if list(params) != order:  # keep the optimizer's parameter order
        reordered = {n: params[n] for n in order}
        params.clear()
        params.update(reordered)
        opt.param_groups[0]["params"] = list(params.values())
    with torch.no_grad():
        for name, value in ckpt["params"].items():
            params[name].copy_(value.to(params[name].device))
    opt.load_state_dict(ckpt["optimizer"])
    if sched is not None and ckpt["scheduler"] is not None:
        sched.load_state_dict(ckpt["scheduler"])
    objective.load_state_dict(ckpt["objective_state"])
    result.history = list(ckpt["history"])
    result.step_seconds = list(ckpt["step_seconds"])
    result.num_skipped = ckpt["num_skipped"]
    result.validation_history = [(int(s), float(v)) for s, v in ckpt["validation_history"]]
    state.step, state.epoch, state.batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
    state.epoch_rng = ckpt["epoch_rng"]
    if dist_ctx.active and ckpt["rank_rng"] is not None:
        set_rng_state(ckpt["rank_rng"][dist_ctx.rank])
    else:
        set_rng_state(ckpt["rng"])
