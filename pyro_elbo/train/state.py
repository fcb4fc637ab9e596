"""The explicit training state: everything a run is, and its ``state_dict``/``load_state_dict``.

A resume validates the whole checkpoint against the running program before it changes anything
(parameters, optimizer, scheduler, objective, random state), and undoes what it did if applying
still fails: a refused resume leaves the process exactly as it was.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from pyro_elbo import distributed
from pyro_elbo._pyro.params import constrained_value
from pyro_elbo._random import rng_state, set_rng_state
from pyro_elbo._typing import Guide, Model
from pyro_elbo.compile import CompiledLoss, FlatAdam
from pyro_elbo.objectives import Objective
from pyro_elbo.train.checkpoint import CHECKPOINT_FORMAT, FIELDS_2, missing_fields
from pyro_elbo.train.data import DataPosition
from pyro_elbo.train.result import FitResult
from pyro_elbo.train.steppers import Stepper, stepper_for

if TYPE_CHECKING:
    from pyro_elbo.compile.inductor import CompileStats

#: optimizer options that choose an implementation, not the update: never a difference
_IMPLEMENTATION_OPTIONS = {"params", "lr", "initial_lr", "fused", "foreach", "capturable", "differentiable"}


@dataclass
class TrainState:
    """A training run: what :func:`~pyro_elbo.train.init` builds and :func:`~pyro_elbo.train.step`
    advances (tensors are updated in place, as ``torch.optim`` does; the state is also returned).

    The program (``model``, ``guide``, ``objective``, default ``args``/``kwargs``) and the step's
    rules (``clip_norm``, ``on_nonfinite``, ``max_consecutive_skips``, ``compiled``, ``device``,
    ``context``) are fixed by ``init``; the rest is the run's state, saved by :meth:`state_dict`.
    """

    model: Model
    guide: Guide
    objective: Objective
    params: dict[str, Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    clip_norm: float | None = None
    on_nonfinite: str = "raise"
    max_consecutive_skips: int = 10
    compiled: CompiledLoss | None = None
    device: torch.device | None = None
    context: distributed.Context = field(default_factory=distributed.Context)
    #: what a resume must match: ``lr``, the optimizer, scheduler and objective (by name/repr),
    #: ``compile`` and the parameters' constraints (by name)
    settings: dict[str, Any] = field(default_factory=dict)
    position: DataPosition = field(default_factory=DataPosition)
    #: the losses so far, as floats (``history``) and as device tensors not yet read (see :meth:`record_loss`)
    loss_floats: list[float] = field(default_factory=list, repr=False)
    loss_tensors: list[Tensor] = field(default_factory=list, repr=False)
    step_seconds: list[float] = field(default_factory=list)
    validation_history: list[tuple[int, float]] = field(default_factory=list)
    num_skipped: int = 0
    consecutive_skips: int = 0
    compile_seconds: float | None = None
    #: ``fit(compile="auto")``'s choice and its reason, in one line
    compile_decision: str | None = None
    resumed_from_step: int | None = None
    #: the compiled Adam step's flat parameter and moment buffers (:mod:`pyro_elbo.compile.flat`)
    flat: FlatAdam | None = field(default=None, repr=False)
    #: the flat compiled step's non-finite ledger is read every this many steps
    #: (:func:`~pyro_elbo.train.nonfinite.settle`; :func:`~pyro_elbo.train.init` sets 1 with a
    #: scheduler or ``compile_backend="eager"``)
    settle_every: int = 256
    #: ``(step, args, kwargs, loss)`` of the flat compiled steps since its ledger was last read
    unsettled: list[tuple[int, tuple[Any, ...], dict[str, Any], float | Tensor]] = field(
        default_factory=list, repr=False
    )
    #: bytes of minibatch tensors those steps hold (their ledger is read before it passes 64 MiB)
    unsettled_bytes: int = field(default=0, repr=False)
    #: what takes each step (:mod:`pyro_elbo.train.steppers`), chosen from ``compiled``
    stepper: Stepper = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.stepper = stepper_for(self.compiled)

    #: device losses are read in one batch once this many are waiting
    FLUSH_EVERY = 256

    @property
    def history(self) -> list[float]:
        """The loss of every step taken (skipped steps included, as NaN/inf)."""
        self.flush_losses()
        return self.loss_floats

    @history.setter
    def history(self, values: list[float]) -> None:
        self.loss_tensors.clear()
        self.loss_floats = list(values)

    def record_loss(self, loss: float | Tensor) -> None:
        """Append a step's loss: a float as is, a 0-d device tensor kept unread until
        :attr:`history` is read or :data:`FLUSH_EVERY` are waiting (then read in one transfer)."""
        if isinstance(loss, Tensor):
            self.loss_tensors.append(loss)
            if len(self.loss_tensors) >= self.FLUSH_EVERY:
                self.flush_losses()
        else:
            if self.loss_tensors:
                self.flush_losses()
            self.loss_floats.append(loss)

    def flush_losses(self) -> None:
        """Read the losses kept as tensors into :attr:`history` (one stack and one transfer)."""
        if self.loss_tensors:
            try:  # float32 -> Python float is exact, so no conversion first
                values = torch.stack(self.loss_tensors).tolist()
            except RuntimeError:  # different devices or shapes
                values = [float(t) for t in self.loss_tensors]
            self.loss_tensors.clear()
            self.loss_floats.extend(values)

    @property
    def step(self) -> int:
        """Optimizer steps taken (skipped steps included)."""
        return self.position.step

    def constrained_params(self) -> dict[str, Tensor]:
        """Parameter name -> constrained value, detached and cloned (the non-finite ledger read
        first: :meth:`settle`)."""
        self.settle()
        return {name: constrained_value(name, p).detach().clone() for name, p in self.params.items()}

    def settle(self) -> None:
        """Read the compiled step's non-finite ledger now (:func:`~pyro_elbo.train.nonfinite.settle`):
        count skipped steps, and raise :class:`~pyro_elbo.NonFiniteLossError` for a refused one.
        :meth:`state_dict`, :meth:`result` and :meth:`release_flat_buffers` call it first."""
        self.stepper.settle(self)

    def release_flat_buffers(self) -> None:
        """Parameters and Adam state out of the compiled step's flat buffers, each in its own memory
        (see :mod:`pyro_elbo.compile.flat`); a later compiled step lays them out again. The ledger is
        read first (:meth:`settle`), and the buffers are released even when that raises."""
        self.stepper.release(self)

    def result(self, stop_reason: str = "completed") -> FitResult:
        """The run so far as a :class:`~pyro_elbo.FitResult`."""
        self.settle()
        return FitResult(
            history=list(self.history),
            step_seconds=list(self.step_seconds),
            num_skipped=self.num_skipped,
            validation_history=list(self.validation_history),
            stop_reason=stop_reason,
            params=self.constrained_params(),
            objective=self.objective,
            resumed_from_step=self.resumed_from_step,
            compile_seconds=self.compile_seconds,
            compile_decision=self.compile_decision,
            compile_stats=self.compile_stats(),
        )

    def compile_stats(self) -> CompileStats | None:
        """What compiling the step's graph did (the last graph, if the inputs' layout changed and
        another was compiled); ``None`` when no graph was compiled."""
        graphs = self.compiled.compile_stats if self.compiled is not None else {}
        return list(graphs.values())[-1] if graphs else None

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run bit-identically, as a checkpoint ``dict`` (format
        ``pyro_elbo.checkpoint/2``). Under ``torch.distributed`` every rank must call it (the
        ranks' random states are gathered)."""
        self.settle()
        ctx = self.context
        return self._snapshot(distributed.gather_rng_states(ctx, rng_state) if ctx.active else None)

    def _snapshot(self, rank_rng: list[dict[str, Any]] | None) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "settings": dict(self.settings),
            "objective": repr(self.objective),
            "objective_state": self.objective.state_dict(),
            "param_names": list(self.params),
            "params": {name: p.detach().clone() for name, p in self.params.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "step": self.position.step,
            "epoch": self.position.epoch,
            "batch_in_epoch": self.position.batch_in_epoch,
            "epoch_rng": self.position.epoch_rng,
            "history": list(self.history),
            "step_seconds": list(self.step_seconds),
            "num_skipped": self.num_skipped,
            "validation_history": [list(v) for v in self.validation_history],
            "rng": rng_state(),
            "world_size": self.context.world_size,
            "rank_rng": rank_rng,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the run saved in ``state`` (a :meth:`state_dict` or
        :func:`~pyro_elbo.train.load_checkpoint`'s result).

        Everything is checked before anything changes: the fields, the parameters' names and
        shapes, the world size, the settings (``lr``, optimizer, its options, scheduler,
        objective) and that the optimizer state loads into this optimizer. To continue with other
        settings, load with the checkpoint's settings and then change them explicitly (e.g.
        ``for g in state.optimizer.param_groups: g["lr"] = 1e-3``).

        Raises:
            ValueError: naming what is missing or differs; nothing was changed.
        """
        missing = missing_fields(state, FIELDS_2)
        if missing:
            raise ValueError(f"the training state lacks the field(s) {missing}; nothing was loaded")
        check_same_program(state, self.params)
        check_world_size(state, self.context)
        check_settings(state, self)
        check_optimizer_loads(state, self.optimizer)
        backup = self._snapshot(None)
        backup["optimizer"] = copy.deepcopy(backup["optimizer"])
        try:
            self._apply(state)
        except BaseException:
            self._apply(backup)
            raise

    def _apply(self, state: dict[str, Any]) -> None:
        order = state["param_names"]
        if list(self.params) != order:  # keep the optimizer's parameter order
            reordered = {n: self.params[n] for n in order}
            self.params.clear()
            self.params.update(reordered)
            self.optimizer.param_groups[0]["params"] = list(self.params.values())
        with torch.no_grad():
            for name, value in state["params"].items():
                self.params[name].copy_(value.to(self.params[name].device))
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.objective.load_state_dict(state["objective_state"])
        self.unsettled.clear()  # steps of the run being replaced: their ledger no longer matters
        self.unsettled_bytes = 0
        self.history = list(state["history"])
        self.step_seconds = list(state["step_seconds"])
        self.num_skipped = state["num_skipped"]
        self.validation_history = [(int(s), float(v)) for s, v in state["validation_history"]]
        self.position = DataPosition(state["step"], state["epoch"], state["batch_in_epoch"], state["epoch_rng"])
        if self.context.active and state["rank_rng"] is not None:
            set_rng_state(state["rank_rng"][self.context.rank])
        else:
            set_rng_state(state["rng"])


def check_same_program(state: dict[str, Any], params: dict[str, Tensor]) -> None:
    """The checkpoint's parameters have this program's names and shapes."""
    saved_shapes = {n: tuple(t.shape) for n, t in state["params"].items()}
    current_shapes = {n: tuple(p.shape) for n, p in params.items()}
    if saved_shapes == current_shapes and sorted(state["param_names"]) == sorted(current_shapes):
        return
    missing = sorted(set(current_shapes) - set(saved_shapes))
    extra = sorted(set(saved_shapes) - set(current_shapes))
    differ = sorted(n for n in set(saved_shapes) & set(current_shapes) if saved_shapes[n] != current_shapes[n])
    parts = [
        f"parameters not in the checkpoint: {missing}" if missing else "",
        f"parameters only in the checkpoint: {extra}" if extra else "",
        f"shapes differ for {differ}" if differ else "",
        "its param_names do not match its params" if not (missing or extra or differ) else "",
    ]
    raise ValueError(
        "the checkpoint belongs to a different model/guide: "
        + "; ".join(part for part in parts if part)
        + ". Nothing was loaded or overwritten; use another checkpoint path or resume=False."
    )


def check_world_size(state: dict[str, Any], context: distributed.Context) -> None:
    if state["world_size"] != context.world_size:
        raise ValueError(
            f"the checkpoint was written by {state['world_size']} process(es) but {context.world_size} are "
            "running; resume with the same world size."
        )


def check_settings(state: dict[str, Any], train_state: TrainState) -> None:
    """A resume continues a run: refuse, naming each difference, if this call's ``lr``, optimizer,
    optimizer options, scheduler or objective differ from the checkpoint's."""
    saved, now = state["settings"], train_state.settings
    differences = []
    if saved["lr"] is not None and float(saved["lr"]) != float(now["lr"]):
        differences.append(f"lr={saved['lr']!r} in the checkpoint, lr={now['lr']!r} now")
    for key in ("optimizer", "scheduler"):
        if saved[key] is not None and saved[key] != now[key]:
            differences.append(f"{key} {saved[key]} in the checkpoint, {now[key]} now")
    if state["scheduler"] is None and train_state.scheduler is not None:
        differences.append("no scheduler in the checkpoint, a scheduler now")
    if state["scheduler"] is not None and train_state.scheduler is None:
        differences.append("a scheduler in the checkpoint, none now")
    if saved["objective"] != repr(train_state.objective):
        differences.append(f"objective {saved['objective']} in the checkpoint, {train_state.objective!r} now")
    differences += _option_differences(state["optimizer"]["param_groups"], train_state.optimizer.param_groups)
    differences += recorded_setting_differences(saved, now)
    if differences:
        raise ValueError(
            "resume=True refuses to continue a run with other settings: "
            + "; ".join(differences)
            + ". Nothing was loaded or overwritten. Pass the checkpoint's settings to continue it, or "
            "another checkpoint path (or resume=False) to start a new run."
        )


def recorded_setting_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``compile`` and each parameter's constraint, where the checkpoint records them (files
    written before they were recorded are not checked for them)."""
    differences = []
    if "compile" in saved and "compile" in now and saved["compile"] != now["compile"]:
        differences.append(f"compile={saved['compile']!r} in the checkpoint, compile={now['compile']!r} now")
    saved_constraints, constraints = saved.get("constraints") or {}, now.get("constraints") or {}
    for name in sorted(set(saved_constraints) & set(constraints)):
        if saved_constraints[name] != constraints[name]:
            differences.append(
                f"parameter {name!r} has constraint {saved_constraints[name]} in the checkpoint, "
                f"{constraints[name]} now (its saved unconstrained value would be read through the new one)"
            )
    return differences


def _option_differences(saved_groups: list[dict[str, Any]], groups: list[dict[str, Any]]) -> list[str]:
    if len(saved_groups) != len(groups):
        return [f"{len(saved_groups)} optimizer parameter group(s) in the checkpoint, {len(groups)} now"]
    differences = []
    for index, (saved, group) in enumerate(zip(saved_groups, groups)):
        for key in sorted((set(saved) & set(group)) - _IMPLEMENTATION_OPTIONS):
            if _plain(saved[key]) != _plain(group[key]):
                where = f" (group {index})" if len(groups) > 1 else ""
                differences.append(
                    f"optimizer option {key}={_plain(saved[key])!r} in the checkpoint, {_plain(group[key])!r} now{where}"
                )
    return differences


def _plain(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    return value


def check_optimizer_loads(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """Load the saved optimizer state into a copy of ``optimizer``: it must load and leave every
    option this optimizer needs (an SGD state in Adam lacks ``betas``)."""
    name = type(optimizer).__name__
    saved_groups = state["optimizer"]["param_groups"]
    trial = copy.deepcopy(optimizer)
    try:
        trial.load_state_dict(state["optimizer"])
        loaded_groups = trial.param_groups
        failure = ""
    except Exception as error:
        loaded_groups, failure = saved_groups, f" ({type(error).__name__}: {error})"
    for group, loaded in zip(optimizer.param_groups, loaded_groups):
        lacking = sorted(set(group) - set(loaded))
        if lacking:
            extra = sorted(set(loaded) - set(group) - _IMPLEMENTATION_OPTIONS)
            raise ValueError(
                f"the checkpoint's optimizer state lacks the option(s) {lacking} that {name} needs (it has "
                f"{extra or 'no other options'}){failure}: it was written by another optimizer. Resume with the "
                "optimizer that wrote it. Nothing was loaded or overwritten."
            )
    if failure:
        raise ValueError(
            f"the checkpoint's optimizer state does not load into {name}{failure}. Nothing was loaded or overwritten."
        )
