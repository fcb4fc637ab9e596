"""Gradient signal-to-noise ratio of a variational objective at the current parameters."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pyro_elbo._pyro.inspect import raise_if_nonfinite_observed
from pyro_elbo._pyro.params import loss_and_params
from pyro_elbo._typing import Guide, Model
from pyro_elbo.objectives import ELBO, Objective


def gradient_snr(
    model: Model,
    guide: Guide,
    *args: Any,
    objective: Objective | None = None,
    num_samples: int = 100,
    **kwargs: Any,
) -> dict[str, Tensor]:
    """Per-element gradient signal-to-noise ratio :math:`|E g| / \\mathrm{sd}(g)` of an objective.

    Draws ``num_samples`` independent gradients at the current parameters (nothing is updated).
    IWAE's guide SNR falls like :math:`1/\\sqrt K` as K grows; DReG's does not.

    Returns:
        parameter name -> SNR tensor shaped like the parameter.

    Raises:
        ValueError: ``num_samples < 2``, observed data with ``inf``/``nan`` (names the site), or a
            model and guide without trainable parameters.

    References:
        | Tighter Variational Bounds are Not Necessarily Better (Rainforth et al., 2018)
        | https://arxiv.org/abs/1802.04537
    """
    objective = ELBO() if objective is None else objective
    if num_samples < 2:
        raise ValueError(f"gradient_snr needs num_samples >= 2, got {num_samples}")
    raise_if_nonfinite_observed(model, guide, args, kwargs, caller="gradient_snr")
    draws: dict[str, list[Tensor]] = {}
    for _ in range(num_samples):
        loss, params = loss_and_params(lambda: objective.differentiable_loss(model, guide, *args, **kwargs))
        if not params:
            raise ValueError(
                "gradient_snr: the model and guide have no trainable parameters (pyro.param or "
                "PyroModule parameters), so there is no gradient to measure"
            )
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for name, param, grad in zip(params, params.values(), grads):
            draws.setdefault(name, []).append(torch.zeros_like(param) if grad is None else grad.detach())
    result = {}
    for name, values in draws.items():
        stacked = torch.stack(values)
        result[name] = stacked.mean(0).abs() / stacked.std(0).clamp_min(torch.finfo(stacked.dtype).tiny)
    return result


__all__ = ["gradient_snr"]
