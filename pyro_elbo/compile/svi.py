"""Compiled ``loss_and_grads`` for ``pyro.infer.SVI`` (``Objective(compile=True)``)."""

from __future__ import annotations

from typing import Any

import pyro

from pyro_elbo._pyro.cache import ProgramCache
from pyro_elbo._pyro.params import loss_and_params
from pyro_elbo._typing import Guide, Model
from pyro_elbo.compile.graph import CompiledLoss, LossFunction


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
