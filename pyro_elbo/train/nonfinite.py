"""Non-finite steps: refusing or skipping them, naming the site, and reading the compiled step's
ledger.

Every path leaves parameters and optimizer state exactly as before a non-finite step. The eager
and per-parameter compiled paths know at once whether a step was finite (one host read each). The
flat compiled Adam step keeps the count on the device instead (:func:`~pyro_elbo.compile.adam.guarded_step`):
under ``on_nonfinite="raise"`` the first non-finite step halts it, so that step and every later one
change nothing, and :func:`settle` reads it every ``state.settle_every`` steps (and before a
checkpoint, a result or the end of ``fit``), then raises for the step that failed, with its number,
its data and the run's state rewound to before it (losses, timings, step count). Under ``"skip"``
the ledger skips non-finite steps itself and halts after ``max_consecutive_skips`` in a row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from pyro_elbo._pyro.log_weights import log_weights
from pyro_elbo._random import set_torch_rng_state, torch_rng_state
from pyro_elbo.train.result import NonFiniteLossError

if TYPE_CHECKING:
    from pyro_elbo.train.state import TrainState


def refuse_or_skip(
    state: TrainState, loss: float, args: tuple[Any, ...], kwargs: dict[str, Any], rng: dict[str, Any] | None
) -> None:
    """A step found non-finite at once: raise (``"raise"``), or count it as skipped and raise
    after ``max_consecutive_skips`` in a row. ``rng``: the random state before the step, to
    replay its draws when naming the site (``None``: new draws)."""
    if state.on_nonfinite == "raise":
        raise_nonfinite(state, state.step, loss, args, kwargs, rng)
    state.consecutive_skips += 1
    state.num_skipped += 1
    if state.consecutive_skips >= state.max_consecutive_skips:
        raise_too_many_skips(state.consecutive_skips, state.step)


def raise_nonfinite(
    state: TrainState,
    step: int,
    loss: float,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    rng: dict[str, Any] | None,
) -> None:
    culprit = find_nonfinite_site(state, args, kwargs, rng)
    raise NonFiniteLossError(
        f"step {step}: the loss or its gradient is not finite ({loss}){culprit}; "
        "parameters and optimizer state were left as before this step. Pass "
        "on_nonfinite='skip' to skip such steps."
    )


def raise_too_many_skips(consecutive: int, step: int) -> None:
    raise NonFiniteLossError(
        f"{consecutive} consecutive non-finite steps (last at step {step}); "
        "stopping. Lower the learning rate or check the data."
    )


def settle(state: TrainState, rng_of_last: dict[str, Any] | None = None) -> None:
    """Read the flat compiled step's ledger for the steps taken since the last read (one host
    read) and act on it as the eager path would have at each step: count the skipped steps, and
    when the ledger halted, rewind the run's record to before the step that halted it (the
    parameters and Adam state are already there: the ledger kept every later step from writing)
    and raise :class:`~pyro_elbo.NonFiniteLossError` for that step. ``rng_of_last``: the random
    state before the last step, to replay its draws if it is the one that failed."""
    pending, flat = state.unsettled, state.flat
    if not pending:
        return
    if flat is None:  # laid out again or released since: read by whoever released it
        pending.clear()
        return
    new_skipped, consecutive, halted = flat.read_ledger()
    steps = list(pending)
    pending.clear()
    state.unsettled_bytes = 0
    state.consecutive_skips = consecutive if halted < 0 else 0
    if state.on_nonfinite == "skip":
        state.num_skipped += new_skipped
    if halted < 0:
        return
    failed_step, args, kwargs, loss = steps[halted]
    _rewind(state, state.step - failed_step)
    if state.on_nonfinite == "raise":
        rng = rng_of_last if halted == len(steps) - 1 else None
        raise_nonfinite(state, failed_step, float(loss), args, kwargs, rng)
    raise_too_many_skips(consecutive, failed_step)


def _rewind(state: TrainState, steps: int) -> None:
    """Forget the last ``steps`` steps' losses, timings and count (steps that changed nothing)."""
    if steps <= 0:
        return
    state.flush_losses()
    del state.loss_floats[max(0, len(state.loss_floats) - steps) :]
    del state.step_seconds[max(0, len(state.step_seconds) - steps) :]
    state.position.step -= steps


def find_nonfinite_site(
    state: TrainState, args: tuple[Any, ...], kwargs: dict[str, Any], rng: dict[str, Any] | None
) -> str:
    """Name the first site whose log-density is not finite: replaying the failed step's draws
    (``rng``, the random state before it), or, without it, drawing anew at the parameters the
    failed step left unchanged (the message says which)."""
    objective, model, guide = state.objective, state.model, state.guide
    saved = torch_rng_state()
    how = "" if rng is not None else " (found by re-running the step at the parameters before it with new draws)"
    try:
        if rng is not None:
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
                outside = (
                    " (-inf: a value outside the site's support, e.g. a guide draw where the model's density is zero)"
                    if role == "model" and bool((value == -float("inf")).any())
                    else ""
                )
                return f"; the {role} site '{name}' has a non-finite log-density{outside}{how}"
    return f"; every site's log-density is finite, so the gradient overflowed{how}"
