"""Loading a finished run for analysis: :func:`load` puts a checkpoint's parameters into a model
and guide without training, and returns the :class:`~pyro_elbo.FitResult` of the run."""

from __future__ import annotations

import os
from typing import Any

import torch

from pyro_elbo._pyro.params import constrained_value, discover_params
from pyro_elbo._typing import Guide, Model
from pyro_elbo.objectives import Objective
from pyro_elbo.train.checkpoint import load_checkpoint
from pyro_elbo.train.loop import _unique
from pyro_elbo.train.result import FitResult


def load(
    checkpoint: str | os.PathLike[str],
    model: Model,
    guide: Guide,
    *args: Any,
    objective: Objective | None = None,
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> FitResult:
    """A finished (or interrupted) run of :func:`~pyro_elbo.fit`, loaded for analysis without training.

    Runs guide and model once on ``args`` (as ``fit`` does before its first step, without using
    the random stream) to create every lazily initialized parameter, checks that the checkpoint
    holds exactly this program's parameters (names and shapes), and copies its values into them:
    afterwards ``guide`` (and ``model``'s own parameters, the param store and ``pyro.module``
    networks) are those of the run, ready for :func:`~pyro_elbo.kl_gap`,
    :func:`~pyro_elbo.to_inference_data` or sampling. The optimizer state and the random state
    saved with the run are left alone; to continue training, call ``fit`` with
    ``checkpoint=..., resume=True``.

    Args:
        checkpoint: a file written by ``fit(checkpoint=...)`` or ``pyro-elbo run`` (``OUT/checkpoint.pt``).
        model, guide, *args, **kwargs: the program and the arguments it was trained on (one batch
            of them for a run on a ``DataLoader``: only their shapes matter here).
        objective: the run's objective, to attach to the result and restore its state (e.g. the
            ELBO's running baselines); it must be the run's (its repr is compared). ``None``
            leaves ``FitResult.objective`` empty.
        device: where the parameters go (default: where the program creates them).

    Returns:
        The :class:`~pyro_elbo.FitResult` of the run so far: loss history, step times, skipped
        steps, validation losses, the parameters' constrained values; ``stop_reason`` is
        ``"loaded"``.

    Raises:
        ValueError: the file is not a readable checkpoint, or belongs to another program (each
            missing, extra or differently shaped parameter named), or ``objective`` differs from
            the run's.
    """
    state = load_checkpoint(checkpoint, map_location=device)
    if objective is not None and repr(objective) != state["objective"]:
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} was trained with {state['objective']}, not {objective!r}: "
            "pass the run's objective, or objective=None"
        )
    params = _unique(discover_params(model, guide, *args, **kwargs))
    saved = state["params"]
    shapes = {name: tuple(p.shape) for name, p in params.items()}
    saved_shapes = {name: tuple(t.shape) for name, t in saved.items()}
    if shapes != saved_shapes:
        missing = sorted(set(shapes) - set(saved_shapes))
        extra = sorted(set(saved_shapes) - set(shapes))
        differ = sorted(n for n in set(shapes) & set(saved_shapes) if shapes[n] != saved_shapes[n])
        parts = [
            f"parameters not in the checkpoint: {missing}" if missing else "",
            f"parameters only in the checkpoint: {extra}" if extra else "",
            ", ".join(f"{n}: {saved_shapes[n]} in the checkpoint, {shapes[n]} here" for n in differ),
        ]
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} belongs to another model/guide: "
            + "; ".join(p for p in parts if p)
            + ". Pass the model and guide (and arguments of the same shapes) that were trained; nothing was loaded."
        )
    with torch.no_grad():
        for name, param in params.items():
            if device is not None:
                param.data = param.data.to(device)
            param.copy_(saved[name].to(param.device))
    if objective is not None:
        objective.load_state_dict(state["objective_state"])
    return FitResult(
        history=[float(v) for v in state["history"]],
        step_seconds=[float(v) for v in state["step_seconds"]],
        num_skipped=int(state["num_skipped"]),
        validation_history=[(int(s), float(v)) for s, v in state["validation_history"]],
        stop_reason="loaded",
        params={name: constrained_value(name, p).detach().clone() for name, p in params.items()},
        objective=objective,
    )
