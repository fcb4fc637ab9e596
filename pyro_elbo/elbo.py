"""One ``pyro.infer.ELBO`` adapter that turns any registered estimator into an objective.

Every objective implements a single path, :meth:`Objective.differentiable_loss`; ``loss``,
``loss_and_grads`` and the module form ``objective(model, guide)`` all go through it, so they agree
on the same draws. The loss is ``-bound`` for lower bounds and ``+bound`` for upper bounds.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import pyro.infer
import torch
from torch import Tensor

from pyro_elbo._typing import Guide, Model
from pyro_elbo.objectives import ESTIMATORS, Estimator
from pyro_elbo.weights import LogWeights, guess_max_plate_nesting, log_weights, trainable_params


class Objective(pyro.infer.ELBO):
    """A variational objective built from a registered estimator.

    Use it wherever Pyro takes an ELBO: ``pyro.infer.SVI(model, guide, optim, loss=objective)``,
    ``objective.loss(model, guide, *args)``, or as a module ``objective(model, guide)(*args)``
    with a plain ``torch.optim`` loop.

    Args:
        estimator: a key of :data:`~pyro_elbo.objectives.ESTIMATORS`.
        num_particles: particles per step, drawn vectorized.
        max_plate_nesting: plate dims used by the model; guessed once per model/guide if ``None``.
        vectorize_particles: ``False`` evaluates particles one at a time, for models that cannot
            broadcast over a leading particle dim.
        compile: in ``loss_and_grads`` (what ``pyro.infer.SVI`` calls), run loss and gradients as one
            captured, compiled graph (:mod:`pyro_elbo.compiled`) after a first eager step; falls back
            to eager with one warning if the model cannot be captured.
        **options: estimator options (``alpha`` for Rényi, ``n`` for CUBO).
    """

    def __init__(
        self,
        estimator: str,
        *,
        num_particles: int = 1,
        max_plate_nesting: int | None = None,
        vectorize_particles: bool = True,
        compile: bool = False,
        **options: Any,
    ) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; choose from {sorted(ESTIMATORS)}")
        spec: Estimator = ESTIMATORS[estimator]
        if isinstance(num_particles, bool) or not isinstance(num_particles, int):
            raise TypeError(f"num_particles must be an int, got {num_particles!r}")
        if num_particles < spec.min_particles:
            raise ValueError(
                f"{type(self).__name__} needs num_particles >= {spec.min_particles}, got {num_particles}"
            )
        unknown = set(options) - set(spec.options)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected options {sorted(unknown)}")
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=math.inf if max_plate_nesting is None else max_plate_nesting,
            vectorize_particles=vectorize_particles,
        )
        self.estimator_name = estimator
        self.spec = spec
        self.options = {**spec.options, **options}
        self._estimator = functools.partial(spec.fn, **self.options)
        self._user_max_plate_nesting = max_plate_nesting
        self._plate_nesting_cache: dict[tuple[Any, ...], int] = {}
        self.compile = compile
        self._compiled: dict[tuple[Any, ...], tuple[Any, list[str]] | None] = {}

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}(num_particles={self.num_particles}{opts})"

    # ---------------------------------------------------------------------------------------

    def log_weights(self, model: Model, guide: Guide, *args: Any, **kwargs: Any) -> LogWeights:
        """The :class:`~pyro_elbo.weights.LogWeights` this objective is computed from."""
        need = self.spec.needs if torch.is_grad_enabled() else frozenset()
        return log_weights(
            model,
            guide,
            *args,
            num_particles=self.num_particles,
            max_plate_nesting=self._plate_nesting(model, guide, args, kwargs),
            vectorize_particles=self.vectorize_particles,
            need=need,
            detach_model_params=not self.spec.trains_model,
            **kwargs,
        )

    def bound(self, lw: LogWeights) -> Tensor:
        """The ``[*B]`` bound with this objective's gradient, after checking ``lw`` suits it."""
        name = type(self).__name__
        if self.spec.reparameterized_only and lw.score_sites:
            raise ValueError(
                f"{name} needs reparameterized guide sites, but {', '.join(map(repr, lw.score_sites))} "
                "cannot be reparameterized (e.g. a discrete latent); train it with pyro_elbo.ELBO "
                "(score function with baseline) or pyro_elbo.VIMCO."
            )
        if not self.spec.linear and lw.num_particles > 1 and lw.subsampled_plates:
            raise ValueError(
                f"{name} is not linear in the log-weights, so it cannot be rescaled for the "
                f"subsampled plate(s) {list(lw.subsampled_plates)}, which do not enclose every site "
                "(a per-data-point bound needs every latent inside the data plate). Use ELBO or STL, "
                "or the full data set."
            )
        return self._estimator(lw)

    def differentiable_loss(self, model: Model, guide: Guide, *args: Any, **kwargs: Any) -> Tensor:
        """The scalar loss (``-bound`` or ``+bound``) whose gradient is the estimator's."""
        lw = self.log_weights(model, guide, *args, **kwargs)
        total = self.bound(lw).sum() * lw.batch_scale
        return -total if self.spec.bound == "lower" else total

    def loss(self, model: Model, guide: Guide, *args: Any, **kwargs: Any) -> float:
        """The loss as a float, without gradients."""
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model: Model, guide: Guide, *args: Any, **kwargs: Any) -> float:
        """The loss as a float, after accumulating its gradient into the parameters' ``.grad``."""
        if self.compile:
            compiled = self._compiled_loss_and_grads(model, guide, args, kwargs)
            if compiled is not None:
                return compiled
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=bool(self.retain_graph))
        return float(loss.detach())

    def _compiled_loss_and_grads(
        self, model: Model, guide: Guide, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> float | None:
        from pyro_elbo.compiled import CompiledLoss

        key = _program_key(model, guide)
        store = pyro.get_param_store()
        if key not in self._compiled:  # the first step runs eagerly and names the parameters
            with pyro.poutine.trace(param_only=True) as capture:
                loss = self.differentiable_loss(model, guide, *args, **kwargs)
            if loss.requires_grad:
                loss.backward(retain_graph=bool(self.retain_graph))
            names = list(trainable_params(capture.trace))
            self._compiled[key] = (CompiledLoss(self, model, guide), names) if all(n in store for n in names) else None
            return float(loss.detach())
        entry = self._compiled[key]
        if entry is None:  # parameters outside the param store (module-local): eager
            return None
        compiled, names = entry
        params = {name: store._params[name] for name in names}
        out = compiled(params, args, kwargs)
        if out is None:
            return None
        loss, _, grads = out
        for name, param, grad in zip(names, params.values(), grads):
            param.grad = grad if param.grad is None else param.grad + grad
            pyro.param(name)  # let SVI's parameter trace see it
        return float(loss)

    def _get_trace(self, model: Model, guide: Guide, args: Any, kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not expose single traces; use log_weights()")

    # ---------------------------------------------------------------------------------------

    def _plate_nesting(self, model: Model, guide: Guide, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        if self._user_max_plate_nesting is not None:
            return self._user_max_plate_nesting
        key = _program_key(model, guide)
        if key not in self._plate_nesting_cache:
            self._plate_nesting_cache[key] = guess_max_plate_nesting(model, guide, *args, **kwargs)
        return self._plate_nesting_cache[key]


_KEEP_ALIVE: dict[int, Any] = {}


def _program_key(model: Model, guide: Guide) -> tuple[int, ...]:
    """A cache key for a model/guide pair that survives re-created bound methods (``obj.model``
    is a new object on every access). The objects behind the ids are kept alive, so an id is never
    reused by another program while a cache holds it."""

    def part(fn: Any) -> tuple[int, int]:
        owner, func = getattr(fn, "__self__", None), getattr(fn, "__func__", None)
        objects = (owner, func) if owner is not None and func is not None else (fn, None)
        for obj in objects:
            if obj is not None:
                _KEEP_ALIVE[id(obj)] = obj
        return id(objects[0]), id(objects[1])

    return part(model) + part(guide)


class ELBO(Objective):
    """The evidence lower bound, :math:`\\frac1S\\sum_s \\log w_s`.

    Reparameterized sites get pathwise gradients; non-reparameterized guide sites (discrete
    latents) get a score-function term with a leave-one-out baseline (``num_particles >= 2``) or a
    running-mean baseline (``num_particles = 1``).

    References:
        | Black Box Variational Inference (Ranganath et al., 2014)
        | https://arxiv.org/abs/1401.0118
    """

    def __init__(self, *, num_particles: int = 1, **kwargs: Any) -> None:
        super().__init__("elbo", num_particles=num_particles, **kwargs)
        self._baseline: float | None = None

    def bound(self, lw: LogWeights) -> Tensor:
        if not lw.score_sites or lw.num_particles > 1:
            return super().bound(lw)
        result = self._estimator(lw, baseline=self._baseline)
        mean = float(lw.log_w.detach().mean())
        if math.isfinite(mean):
            self._baseline = mean if self._baseline is None else 0.9 * self._baseline + 0.1 * mean
        return result


class IWAE(Objective):
    """The importance-weighted bound :math:`\\log\\frac1S\\sum_s w_s`, tighter as ``S`` grows.

    References:
        | Importance Weighted Autoencoders (Burda et al., 2016)
        | https://arxiv.org/abs/1509.00519
    """

    def __init__(self, *, num_particles: int = 8, **kwargs: Any) -> None:
        super().__init__("iwae", num_particles=num_particles, **kwargs)


class DReG(Objective):
    """IWAE's value with doubly reparameterized guide gradients (model gradients as IWAE).

    References:
        | Doubly Reparameterized Gradient Estimators for Monte Carlo Objectives (Tucker et al., 2018)
        | https://arxiv.org/abs/1810.04152
    """

    def __init__(self, *, num_particles: int = 8, **kwargs: Any) -> None:
        super().__init__("dreg", num_particles=num_particles, **kwargs)


class STL(Objective):
    """ELBO's value with the "sticking the landing" path-derivative gradient.

    References:
        | Sticking the Landing (Roeder, Wu & Duvenaud, 2017)
        | https://arxiv.org/abs/1703.09194
    """

    def __init__(self, *, num_particles: int = 1, **kwargs: Any) -> None:
        super().__init__("stl", num_particles=num_particles, **kwargs)


class RenyiELBO(Objective):
    """The variational Rényi bound of order ``alpha`` (``alpha=0`` is IWAE; ``alpha != 1``).

    Unlike Pyro's ``RenyiELBO``, the bound is per data point whenever every site sits in the data
    plate, so local-latent models (VAEs) get the intended objective.

    References:
        | Rényi Divergence Variational Inference (Li & Turner, 2016)
        | https://arxiv.org/abs/1602.02311
    """

    def __init__(self, alpha: float = 0.5, *, num_particles: int = 8, **kwargs: Any) -> None:
        if alpha == 1:
            raise ValueError("RenyiELBO(alpha=1) is the ELBO; use pyro_elbo.ELBO instead")
        super().__init__("renyi", num_particles=num_particles, alpha=float(alpha), **kwargs)


class CUBO(Objective):
    """The χ upper bound :math:`\\frac1n\\log\\frac1S\\sum_s w_s^n` (loss = +CUBO); trains the guide only.

    Its gradient is biased for few particles (see :func:`pyro_elbo.objectives.cubo`), hence the
    default of 64. Model parameters receive no gradient: minimizing an upper bound on the evidence
    over the model would fit the model *worse*.

    References:
        | Variational Inference via χ Upper Bound Minimization (Dieng et al., 2017)
        | https://arxiv.org/abs/1611.00328
    """

    def __init__(self, n: float = 2.0, *, num_particles: int = 64, **kwargs: Any) -> None:
        if not n > 1:
            raise ValueError(f"CUBO needs n > 1 to be an upper bound, got n={n}")
        super().__init__("cubo", num_particles=num_particles, n=float(n), **kwargs)


class VIMCO(Objective):
    """IWAE's value with leave-one-out score-function gradients for discrete latents.

    References:
        | Variational Inference for Monte Carlo Objectives (Mnih & Rezende, 2016)
        | https://arxiv.org/abs/1602.06725
    """

    def __init__(self, *, num_particles: int = 8, **kwargs: Any) -> None:
        super().__init__("vimco", num_particles=num_particles, **kwargs)


#: The public objective class of each registered estimator.
OBJECTIVES: dict[str, type[Objective]] = {
    "elbo": ELBO,
    "iwae": IWAE,
    "dreg": DReG,
    "stl": STL,
    "renyi": RenyiELBO,
    "cubo": CUBO,
    "vimco": VIMCO,
}


def make_objective(name: str, *, num_particles: int | None = None, **kwargs: Any) -> Objective:
    """Build an objective from its name (case-insensitive), as the command line does."""
    key = name.lower().replace("_", "").replace("-", "")
    aliases = {"renyielbo": "renyi", "traceelbo": "elbo"}
    key = aliases.get(key, key)
    if key not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose from {', '.join(sorted(OBJECTIVES))}")
    if num_particles is not None:
        kwargs["num_particles"] = num_particles
    return OBJECTIVES[key](**kwargs)
