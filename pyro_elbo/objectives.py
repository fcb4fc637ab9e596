"""Objectives: one ``pyro.infer.ELBO`` adapter that turns any estimator into a variational objective.

Every objective implements a single path, :meth:`Objective.differentiable_loss`; ``loss``,
``loss_and_grads`` and the module form ``objective(model, guide)`` all go through it, so they agree
on the same draws. The loss is ``-bound`` for lower bounds and ``+bound`` for upper bounds.

The registry is :data:`OBJECTIVES`: each public class carries its :class:`~pyro_elbo.estimators.Estimator`
spec as the class attribute ``estimator``. A user's own estimator needs no edit to the package::

    def tempered(lw, *, beta=0.5):
        return replace_grad(lw.log_w.mean(0), ...)

    objective = Objective(Estimator(tempered, options={"beta": 0.5}), num_particles=8)
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import pyro.infer
import torch
from torch import Tensor

from pyro_elbo._pyro.cache import ProgramCache
from pyro_elbo._pyro.log_weights import LogWeights, guess_max_plate_nesting, log_weights
from pyro_elbo._pyro.particles import normalize as normalize_path
from pyro_elbo._typing import Guide, Model
from pyro_elbo.compile import SVICompiledSteps
from pyro_elbo.estimators import Estimator, cubo, dreg, elbo, iwae, renyi, stl, vimco

#: Options of ``pyro.infer.ELBO`` accepted for compatibility that change nothing here (documented).
_PYRO_ONLY_OPTIONS = ("strict_enumeration_warning", "ignore_jit_warnings", "jit_options", "tail_adaptive_beta")


class Objective(pyro.infer.ELBO):
    """A variational objective built from an estimator.

    Use it wherever Pyro takes an ELBO: ``pyro.infer.SVI(model, guide, optim, loss=objective)``,
    ``objective.loss(model, guide, *args)``, or as a module ``objective(model, guide)(*args)``
    with a plain ``torch.optim`` loop.

    Args:
        estimator: an :class:`~pyro_elbo.estimators.Estimator` (a user's own estimator), or the
            name of a registered one (a key of :data:`OBJECTIVES`).
        num_particles: particles per step, drawn vectorized.
        max_plate_nesting: plate dims used by the model; guessed once per model/guide if ``None``.
        vectorize_particles: how particles are drawn: ``"auto"`` (default; the fastest path the
            model runs on, decided once per model and argument shapes), ``"plate"`` (``True``),
            ``"vmap"`` or ``"sequential"`` (``False``); see :mod:`pyro_elbo._pyro.particles`.
        compile: in ``loss_and_grads`` (what ``pyro.infer.SVI`` calls), run loss and gradients as one
            captured, compiled graph (:mod:`pyro_elbo.compile.svi`) after a first eager step; falls back
            to eager with one warning if the model cannot be captured. ``jit=True`` (Pyro's name for
            its ``JitTrace_ELBO``) means the same.
        retain_graph: passed to ``backward`` in ``loss_and_grads``, as in Pyro.
        strict_enumeration_warning, ignore_jit_warnings, jit_options, tail_adaptive_beta: accepted
            for drop-in compatibility with ``pyro.infer.ELBO``; they have no effect here.
        **options: estimator options (``alpha`` for Rényi, ``n`` for CUBO).
    """

    #: the estimator of a registered subclass (``None`` on the base class)
    estimator: ClassVar[Estimator | None] = None

    def __init__(
        self,
        estimator: str | Estimator,
        *,
        num_particles: int = 1,
        max_plate_nesting: int | None = None,
        vectorize_particles: bool | str = "auto",
        compile: bool = False,
        jit: bool = False,
        retain_graph: bool | None = None,
        **options: Any,
    ) -> None:
        spec = _resolve(estimator)
        if max_plate_nesting is not None and math.isinf(max_plate_nesting):  # Pyro's "guess it"
            max_plate_nesting = None
        normalize_path(vectorize_particles)
        for name in _PYRO_ONLY_OPTIONS:
            options.pop(name, None)
        if isinstance(num_particles, bool) or not isinstance(num_particles, int):
            raise TypeError(f"num_particles must be an int, got {num_particles!r}")
        if num_particles < spec.min_particles:
            raise ValueError(f"{type(self).__name__} needs num_particles >= {spec.min_particles}, got {num_particles}")
        unknown = set(options) - set(spec.options)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected options {sorted(unknown)}")
        super().__init__(  # type: ignore[no-untyped-call]
            num_particles=num_particles,
            max_plate_nesting=math.inf if max_plate_nesting is None else max_plate_nesting,
            vectorize_particles=vectorize_particles,
            retain_graph=retain_graph,
        )
        self.spec = spec
        self.estimator_name = spec.name
        self.options = {**spec.options, **options}
        self.compile = bool(compile or jit)
        self._user_max_plate_nesting = max_plate_nesting
        self._plate_nesting = ProgramCache()
        self._svi_steps = SVICompiledSteps(self) if self.compile else None

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}(num_particles={self.num_particles}{opts})"

    # ---------------------------------------------------------------------------------------
    # the one path

    #: ``need`` flags added to every :meth:`log_weights` call (``ELBO(analytic_kl=True)``)
    _extra_needs: frozenset[str] = frozenset()

    def log_weights(self, model: Model, guide: Guide, *args: Any, **kwargs: Any) -> LogWeights:
        """The :class:`~pyro_elbo.weights.LogWeights` this objective is computed from."""
        need = (self.spec.needs if torch.is_grad_enabled() else frozenset()) | self._extra_needs
        return log_weights(
            model,
            guide,
            *args,
            num_particles=self.num_particles,
            max_plate_nesting=self.plate_nesting(model, guide, args, kwargs),
            vectorize_particles=self.vectorize_particles,
            need=need,
            detach_model_params=not self.spec.trains_model,
            **kwargs,
        )

    def bound(self, lw: LogWeights) -> Tensor:
        """The ``[*B]`` bound with this objective's gradient, after checking ``lw`` suits it."""
        name = type(self).__name__
        if lw.guide_enumerated and self.spec.fn is not elbo:
            sites = ", ".join(map(repr, lw.guide_enumerated))
            raise NotImplementedError(
                f"The guide's site(s) {sites} are enumerated (config_enumerate on the guide). {name}'s "
                "bound would hold their exact sum inside each particle's weight, where the guide's "
                "probabilities of them cancel, so the guide's distribution over them would get no gradient. "
                "Train with pyro_elbo.ELBO (TraceEnum_ELBO's estimator), or drop the enumerate flag to "
                f"sample them ({name} then trains them by the score function where it can); kl_gap and "
                "log_evidence use the exact sum."
            )
        drawn = [n for n in lw.score_sites if n not in lw.observed_score_sites]
        if self.spec.reparameterized_only and drawn:
            raise ValueError(
                f"{name} needs reparameterized guide sites, but {', '.join(map(repr, drawn))} "
                "cannot be reparameterized (e.g. a discrete latent), and its gradient has no "
                "score-function form; train it with pyro_elbo.ELBO (score function with baseline), "
                "pyro_elbo.IWAE, pyro_elbo.RenyiELBO or pyro_elbo.VIMCO (leave-one-out score function)."
            )
        if not self.spec.linear and lw.num_particles > 1 and lw.subsampled_plates:
            raise ValueError(
                f"{name} is not linear in the log-weights, so it cannot be rescaled for the "
                f"subsampled plate(s) {list(lw.subsampled_plates)}, which do not enclose every site "
                "(a per-data-point bound needs every latent inside the data plate). Use ELBO or STL, "
                "or the full data set."
            )
        return self.spec.fn(lw, **self.options)

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
        if self._svi_steps is not None:
            compiled = self._svi_steps(model, guide, args, kwargs)
            if compiled is not None:
                return compiled
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=bool(self.retain_graph))
        return float(loss.detach())

    def _get_trace(self, model: Model, guide: Guide, args: Any, kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not expose single traces; use log_weights()")

    # ---------------------------------------------------------------------------------------
    # state

    def plate_nesting(self, model: Model, guide: Guide, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        """The model's plate nesting: the user's ``max_plate_nesting``, or guessed once per program."""
        if self._user_max_plate_nesting is not None:
            return self._user_max_plate_nesting
        cached = self._plate_nesting.get(model, guide)
        if cached is None:
            cached = guess_max_plate_nesting(model, guide, *args, **kwargs)
            self._plate_nesting.put(model, guide, cached)
        return int(cached)

    def state_dict(self) -> dict[str, Any]:
        """The objective's own training state (e.g. :class:`ELBO`'s running baseline), for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


def _resolve(estimator: str | Estimator) -> Estimator:
    if isinstance(estimator, Estimator):
        return estimator
    if isinstance(estimator, str) and estimator in OBJECTIVES:
        spec = OBJECTIVES[estimator].estimator
        assert spec is not None
        return spec
    raise ValueError(
        f"unknown estimator {estimator!r}; pass a pyro_elbo.estimators.Estimator or one of {sorted(OBJECTIVES)}"
    )


class ELBO(Objective):
    """The evidence lower bound, :math:`\\frac1S\\sum_s \\log w_s`.

    Reparameterized sites get pathwise gradients; non-reparameterized guide sites (discrete
    latents) get a score-function term, Rao-Blackwellized over plates as in Pyro's ``Trace_ELBO``,
    with a leave-one-out baseline (``num_particles >= 2``) or a per-site running-mean baseline
    (``num_particles = 1``). A guide site that declares Pyro's baseline options
    (``infer={"baseline": {...}}``) gets ``TraceGraph_ELBO``'s estimator instead: its downstream
    cost and its own baseline, trained as there (:mod:`pyro_elbo._pyro.score`). Guide sites
    enumerated with ``config_enumerate`` are summed out exactly, as ``TraceEnum_ELBO`` does.

    Accepts ``pyro.infer.Trace_ELBO``'s arguments, ``num_particles`` positionally included.
    ``analytic_kl=True`` uses closed-form KL terms where a latent's guide and prior have one (as
    Pyro's ``TraceMeanField_ELBO``; see :mod:`pyro_elbo._pyro.analytic_kl`): same value and expected
    gradient, lower variance.

    References:
        | Black Box Variational Inference (Ranganath et al., 2014)
        | https://arxiv.org/abs/1401.0118
    """

    estimator = Estimator(elbo, reparameterized_only=False, linear=True)

    def __init__(
        self, num_particles: int = 1, max_plate_nesting: int | None = None, analytic_kl: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(self.estimator, num_particles=num_particles, max_plate_nesting=max_plate_nesting, **kwargs)
        self._baseline: dict[str, Tensor] = {}
        self.analytic_kl = bool(analytic_kl)
        self._extra_needs = frozenset({"analytic_kl"}) if analytic_kl else frozenset()

    def bound(self, lw: LogWeights) -> Tensor:
        if not lw.score_terms:
            return super().bound(lw)
        result = self.spec.fn(lw, baseline=self._baseline)
        self._update_baselines(lw)
        return result

    def _update_baselines(self, lw: LogWeights) -> None:
        """Advance the running baselines in place, as tensors: nothing is read to the host, so a
        captured step (``compile=True``) keeps them in its graph and updates them every call.
        Per site, the running mean of the cost for ``S = 1`` (:math:`b \\leftarrow 0.9 b + 0.1 \\bar c`,
        skipping non-finite costs), and Pyro's decaying average :math:`b \\leftarrow (1-\\beta) c +
        \\beta b` for the sites that ask for it (only when gradients are taken, as
        ``TraceGraph_ELBO`` does). A site's state is created on its first step."""
        for name, (log_r, _) in lw.score_terms.items():
            cost = log_r.detach()
            previous = self._baseline.get(name)
            if name in lw.baseline_decay:
                if not torch.is_grad_enabled():
                    continue
                beta = lw.baseline_decay[name]
                if previous is None or previous.shape != cost.shape:
                    self._baseline[name] = (1 - beta) * cost
                else:
                    with torch.no_grad():
                        previous.copy_((1 - beta) * cost + beta * previous)
            elif lw.num_particles == 1 and name not in lw.score_baselines:
                mean = cost.mean()
                finite = torch.isfinite(mean)
                if previous is None:
                    self._baseline[name] = torch.where(finite, mean, torch.zeros_like(mean))
                else:
                    with torch.no_grad():
                        previous.copy_(torch.where(finite, 0.9 * previous + 0.1 * mean, previous))

    def __copy__(self) -> ELBO:
        """A copy with its own running baselines (``copy.copy`` is how trial runs keep this state)."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone._baseline = {name: value.clone() for name, value in self._baseline.items()}
        return clone

    def state_dict(self) -> dict[str, Any]:
        return {"baseline": dict(self._baseline)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        baseline = state.get("baseline")
        # checkpoints before per-site baselines stored one float (or None): start afresh
        if not isinstance(baseline, dict):
            self._baseline = {}
            return
        self._baseline = {k: v if isinstance(v, Tensor) else torch.as_tensor(float(v)) for k, v in baseline.items()}


class IWAE(Objective):
    """The importance-weighted bound :math:`\\log\\frac1S\\sum_s w_s`, tighter as ``S`` grows.

    Discrete (non-reparameterized) guide sites are trained by the score function with VIMCO's
    leave-one-out control variate: unbiased, with a score-function estimator's variance (see
    :func:`pyro_elbo.estimators.iwae`).

    References:
        | Importance Weighted Autoencoders (Burda et al., 2016)
        | https://arxiv.org/abs/1509.00519
    """

    estimator = Estimator(iwae, reparameterized_only=False)

    def __init__(self, num_particles: int = 8, max_plate_nesting: int | None = None, **kwargs: Any) -> None:
        super().__init__(self.estimator, num_particles=num_particles, max_plate_nesting=max_plate_nesting, **kwargs)


class DReG(Objective):
    """IWAE's value with doubly reparameterized guide gradients (model gradients as IWAE).

    References:
        | Doubly Reparameterized Gradient Estimators for Monte Carlo Objectives (Tucker et al., 2018)
        | https://arxiv.org/abs/1810.04152
    """

    estimator = Estimator(dreg, needs=frozenset({"log_q_stopped", "log_p_stopped_z"}))

    def __init__(self, num_particles: int = 8, max_plate_nesting: int | None = None, **kwargs: Any) -> None:
        super().__init__(self.estimator, num_particles=num_particles, max_plate_nesting=max_plate_nesting, **kwargs)


class STL(Objective):
    """ELBO's value with the "sticking the landing" path-derivative gradient.

    References:
        | Sticking the Landing (Roeder, Wu & Duvenaud, 2017)
        | https://arxiv.org/abs/1703.09194
    """

    estimator = Estimator(stl, linear=True, needs=frozenset({"log_q_stopped"}))

    def __init__(self, num_particles: int = 1, max_plate_nesting: int | None = None, **kwargs: Any) -> None:
        super().__init__(self.estimator, num_particles=num_particles, max_plate_nesting=max_plate_nesting, **kwargs)


class RenyiELBO(Objective):
    """The variational Rényi bound of order ``alpha`` (``alpha=0`` is IWAE; ``alpha != 1``).

    Defaults match Pyro's ``RenyiELBO`` (``alpha=0``, ``num_particles=2``), and so do the positional
    arguments. Unlike Pyro's, the bound is per data point whenever every site sits in the data
    plate, so local-latent models (VAEs) get the intended objective. Discrete guide sites are
    trained as in :class:`IWAE` (leave-one-out score function); Pyro's ``RenyiELBO`` weights their
    score function by a constant, not by the bound, so its guide gradient is biased there.

    References:
        | Rényi Divergence Variational Inference (Li & Turner, 2016)
        | https://arxiv.org/abs/1602.02311
    """

    estimator = Estimator(renyi, reparameterized_only=False, options={"alpha": 0.0})

    def __init__(
        self, alpha: float = 0.0, num_particles: int = 2, max_plate_nesting: int | None = None, **kwargs: Any
    ) -> None:
        if alpha == 1:
            raise ValueError("RenyiELBO(alpha=1) is the ELBO; use pyro_elbo.ELBO instead")
        super().__init__(
            self.estimator,
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            alpha=float(alpha),
            **kwargs,
        )


class CUBO(Objective):
    """The χ upper bound :math:`\\frac1n\\log\\frac1S\\sum_s w_s^n` (loss = +CUBO); trains the guide only.

    Its gradient is biased for few particles (see :func:`pyro_elbo.estimators.cubo`), hence the
    default of 64, and at least 2: with one particle :math:`\\frac1n\\log w^n = \\log w` for every
    ``n``, the single-sample ELBO, and minimizing it trains the guide *away* from the posterior
    (its gradient is the ELBO's, negated). Model parameters receive no gradient:
    minimizing an upper bound on the evidence over the model would fit the model *worse*.

    References:
        | Variational Inference via χ Upper Bound Minimization (Dieng et al., 2017)
        | https://arxiv.org/abs/1611.00328
    """

    estimator = Estimator(
        cubo, bound="upper", reparameterized_only=False, trains_model=False, min_particles=2, options={"n": 2.0}
    )

    def __init__(
        self, n: float = 2.0, num_particles: int = 64, max_plate_nesting: int | None = None, **kwargs: Any
    ) -> None:
        if not n > 1:
            raise ValueError(f"CUBO needs n > 1 to be an upper bound, got n={n}")
        super().__init__(
            self.estimator, num_particles=num_particles, max_plate_nesting=max_plate_nesting, n=float(n), **kwargs
        )


class VIMCO(Objective):
    """IWAE's value with leave-one-out score-function gradients for discrete latents.

    References:
        | Variational Inference for Monte Carlo Objectives (Mnih & Rezende, 2016)
        | https://arxiv.org/abs/1602.06725
    """

    estimator = Estimator(vimco, reparameterized_only=False, min_particles=2)

    def __init__(self, num_particles: int = 8, max_plate_nesting: int | None = None, **kwargs: Any) -> None:
        super().__init__(self.estimator, num_particles=num_particles, max_plate_nesting=max_plate_nesting, **kwargs)


#: The registry: name -> public objective class (each carries its ``estimator`` spec).
OBJECTIVES: dict[str, type[Objective]] = {
    cls.estimator.name: cls for cls in (ELBO, IWAE, DReG, STL, RenyiELBO, CUBO, VIMCO) if cls.estimator is not None
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
