"""Estimators: pure functions of :class:`~pyro_elbo.weights.LogWeights`.

Each estimator reduces the particle dim 0 of ``[S, *B]`` log-weights to a ``[*B]`` tensor whose
**value is the bound** and whose **gradient is the estimator's**, through :func:`replace_grad`.
This module imports no Pyro. A new estimator is one function wrapped in an :class:`Estimator` spec:
pass it to :class:`~pyro_elbo.Objective` (no edit to the package), or give it a class in
:mod:`pyro_elbo.objectives`, where the registry and the contract tests pick it up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from pyro_elbo._pyro.log_weights import LogWeights


# --------------------------------------------------------------------------------------------
# tensor helpers


def logmeanexp(x: Tensor, dim: int = 0) -> Tensor:
    """:math:`\\log \\frac{1}{S} \\sum_s e^{x_s}` along ``dim``, stable in float32 and float64."""
    return torch.logsumexp(x, dim) - math.log(x.shape[dim])


def replace_grad(value: Tensor, surrogate: Tensor) -> Tensor:
    """A tensor equal to ``value`` whose gradient is the gradient of ``surrogate``."""
    return value.detach() + (surrogate - surrogate.detach())


def normalized_weights(log_w: Tensor) -> Tensor:
    """Self-normalized importance weights :math:`\\tilde w_s = w_s / \\sum_t w_t` along dim 0."""
    return torch.softmax(log_w, dim=0)


def leave_one_out_mean(x: Tensor) -> Tensor:
    """For each particle ``s``, the mean of the other ``S - 1`` particles (``S >= 2``)."""
    num = x.shape[0]
    return (x.sum(0, keepdim=True) - x) / (num - 1)


def logsumexp_leave_one_out(x: Tensor) -> Tensor:
    """For each ``s`` along dim 0, :math:`\\log \\sum_{t \\ne s} e^{x_t}` in O(S) memory (``S >= 2``).

    ``lse + log1p(-exp(x_s - lse))`` is stable except for the largest term, whose share can be
    close to 1; that one is computed directly with the maximum masked out.
    """
    total = torch.logsumexp(x, 0, keepdim=True)
    is_max = torch.zeros_like(x, dtype=torch.bool).scatter_(0, x.argmax(0, keepdim=True), True)
    without_max = torch.logsumexp(x.masked_fill(is_max, -math.inf), 0, keepdim=True)
    share = torch.exp(x - total).clamp(max=0.5)  # <= 1/2 for every non-maximal term
    return torch.where(is_max, without_max, total + torch.log1p(-share))


def _stopped_log_q(lw: LogWeights, name: str) -> Tensor:
    if lw.log_q_stopped is None:
        if not torch.is_grad_enabled():  # value only: the stopped log q has the same value
            return lw.log_q
        raise ValueError(f"{name} needs log_weights(..., need={{'log_q_stopped'}})")
    return lw.log_q_stopped


def _check_shape(result: Tensor, lw: LogWeights) -> Tensor:
    if result.shape != lw.log_p.shape[1:]:  # an internal invariant, not user input
        raise RuntimeError(f"estimator returned shape {tuple(result.shape)}, expected {tuple(lw.log_p.shape[1:])}")
    return result


# --------------------------------------------------------------------------------------------
# estimators


def elbo(lw: LogWeights, *, baseline: Mapping[str, Tensor | float] | None = None) -> Tensor:
    """The evidence lower bound :math:`\\frac1S \\sum_s \\log w_s`.

    Reparameterized sites get the pathwise gradient. Each non-reparameterized guide site ``g``
    adds the score term :math:`(\\log r_{g,s} - b_{g,s}) \\nabla \\log q(z_{g,s})`, where
    :math:`\\log r_g` is the log-weight restricted to the site's plates (Pyro's local
    Rao-Blackwellization: a data point's site sees its own factors and the global ones). The
    baseline :math:`b_g` is the site's own when it declares one (Pyro's ``infer={"baseline": ...}``,
    as ``TraceGraph_ELBO`` reads it: ``baseline[g]``, the decaying average, plus
    ``lw.score_baselines[g]``, the learned baseline, which is trained by adding
    :math:`\\sum (\\log r_g - b_g)^2`, in the cost's unscaled units, to the loss); otherwise a
    leave-one-out baseline :math:`b_{g,s} = \\frac{1}{S-1}\\sum_{t \\ne s} \\log r_{g,t}` when
    ``S >= 2``, else ``baseline[g]`` (a running mean kept by :class:`~pyro_elbo.ELBO`). The direct
    gradient of :math:`-\\log q` at such a site has expectation zero and is dropped, as in Pyro.
    A guide that enumerates sites :math:`y` (``lw.elbo_terms``) gives ``TraceEnum_ELBO``'s bound,
    :math:`\\sum_y q(y) \\log \\frac{p(x, y, z_y)}{q(y) q(z_y \\mid y)}`, exact in :math:`y`.

    References:
        | Black Box Variational Inference (Ranganath et al., 2014)
        | https://arxiv.org/abs/1401.0118
        | Neural Variational Inference and Learning in Belief Networks (Mnih & Gregor, 2014)
        | https://arxiv.org/abs/1402.0030
    """
    if lw.elbo_terms is not None:  # the guide enumerates: TraceEnum_ELBO's exact sum over its values
        return _check_shape(lw.elbo_terms.mean(0), lw)
    log_w = lw.log_w
    value = log_w.mean(0)
    if lw.score_terms:
        running = baseline or {}
        score = value.new_zeros(())
        fit: Tensor | None = None  # squared error of the learned baselines, [S, *B]
        for name, (log_r, log_q) in lw.score_terms.items():
            cost = log_r.detach()
            b: Tensor | float
            if name in lw.score_baselines or name in lw.baseline_decay:
                b = running.get(name, 0.0) if name in lw.baseline_decay else 0.0
                learned = lw.score_baselines.get(name)
                if learned is not None:
                    b = learned + b
                    error = ((cost - b) ** 2).sum(-1)
                    fit = error if fit is None else fit + error
                    b = b.detach()
            elif log_w.shape[0] > 1:
                b = leave_one_out_mean(cost)
            else:
                b = running.get(name, 0.0)
            score = score + ((cost - b) * log_q).sum(-1)
        surrogate = value + score.mean(0)
        if fit is not None:  # the loss gains batch_scale**2 * fit: Pyro's baseline loss
            surrogate = surrogate - lw.batch_scale * fit.mean(0)
        if lw.log_q_nonreparam is not None:  # drop the zero-mean direct gradient of log q
            surrogate = surrogate + lw.log_q_nonreparam.mean(0) - lw.log_q_nonreparam.detach().mean(0)
        value = replace_grad(value, surrogate)
    return _check_shape(value, lw)


def _score_surrogate(lw: LogWeights, power: float) -> Tensor:
    """The score-function term of the bound :math:`L = \\frac1c \\log \\frac1S \\sum_s w_s^c`
    (``c = power``) for the non-reparameterized guide sites: :math:`\\sum_s (L - L_{-s})
    \\log q(z_s)`, gradient only, where :math:`L_{-s}` is :math:`L` with :math:`\\log w_s` replaced
    by the mean of the other particles' (VIMCO's leave-one-out control variate). With ``S = 1``
    there is no other particle and the signal is :math:`L = \\log w` itself (plain REINFORCE).

    With the direct gradient of :math:`L` (through the reparameterized sites and through
    :math:`\\log q` at the discrete ones) this is unbiased for :math:`\\nabla E_q[L]`
    (Mnih & Rezende, 2016, eq. 10, for ``c = 1``; the same argument holds for every ``c != 0``).
    """
    scaled = power * lw.log_w.detach()
    num = scaled.shape[0]
    value = logmeanexp(scaled, 0) / power
    if num == 1:
        signal = value.unsqueeze(0)
    else:
        replaced = torch.logaddexp(logsumexp_leave_one_out(scaled), leave_one_out_mean(scaled)) - math.log(num)
        signal = value.unsqueeze(0) - replaced / power
    surrogate = (signal * lw.log_q_score).sum(0)
    return surrogate - surrogate.detach()


def iwae(lw: LogWeights) -> Tensor:
    """The importance-weighted bound :math:`\\log \\frac1S \\sum_s w_s`.

    Reparameterized sites get the pathwise gradient. Non-reparameterized guide sites (discrete
    latents) add VIMCO's score-function term (:func:`vimco`): unbiased, but it carries no gradient
    of :math:`\\log w` through :math:`z`, so its variance is that of a score-function estimator:
    higher than a pathwise gradient's, the more so the wider the spread of :math:`\\log w` (the
    leave-one-out control variate removes the part shared by all particles, not the rest), and
    the guide's gradient signal-to-noise ratio falls like :math:`1/\\sqrt S` as particles are
    added (Rainforth et al., 2018): more particles tighten the bound but slow the guide's training.

    References:
        | Importance Weighted Autoencoders (Burda et al., 2016)
        | https://arxiv.org/abs/1509.00519
        | Variational Inference for Monte Carlo Objectives (Mnih & Rezende, 2016)
        | https://arxiv.org/abs/1602.06725
        | Tighter Variational Bounds are Not Necessarily Better (Rainforth et al., 2018)
        | https://arxiv.org/abs/1802.04537
    """
    value = logmeanexp(lw.log_w, 0)
    if lw.score_sites:
        value = value + _score_surrogate(lw, 1.0)
    return _check_shape(value, lw)


def renyi(lw: LogWeights, *, alpha: float) -> Tensor:
    """The variational Rényi bound :math:`\\frac{1}{1-\\alpha}\\log\\frac1S\\sum_s w_s^{1-\\alpha}`.

    ``alpha = 0`` is IWAE; ``alpha -> 1`` is the ELBO; ``alpha < 0`` gives upper bounds (CUBO).
    Non-reparameterized guide sites get the leave-one-out score-function term of :func:`iwae`
    (with its variance), applied to :math:`w^{1-\\alpha}`.

    References:
        | Rényi Divergence Variational Inference (Li & Turner, 2016)
        | https://arxiv.org/abs/1602.02311
    """
    if alpha == 1:
        raise ValueError("alpha=1 is the ELBO limit of the Rényi bound; use pyro_elbo.ELBO instead")
    value = logmeanexp((1.0 - alpha) * lw.log_w, 0) / (1.0 - alpha)
    if lw.score_sites:
        value = value + _score_surrogate(lw, 1.0 - alpha)
    return _check_shape(value, lw)


def stl(lw: LogWeights) -> Tensor:
    """The ELBO with the "sticking the landing" path-derivative gradient.

    The value is :func:`elbo`'s; the gradient drops the score term of :math:`\\log q`, which has
    zero mean, so the gradient is exactly zero when :math:`q` equals the posterior.

    References:
        | Sticking the Landing (Roeder, Wu & Duvenaud, 2017)
        | https://arxiv.org/abs/1703.09194
    """
    value = lw.log_w.mean(0)
    surrogate = (lw.log_p - _stopped_log_q(lw, "stl")).mean(0)
    return _check_shape(replace_grad(value, surrogate), lw)


def dreg(lw: LogWeights) -> Tensor:
    """IWAE with doubly reparameterized gradients for the guide.

    Guide parameters get :math:`\\sum_s \\tilde w_s^2 \\nabla_\\phi \\log w_s` through the path
    only; model parameters keep IWAE's :math:`\\sum_s \\tilde w_s \\nabla_\\theta \\log p(x,z_s)`
    (unlike TFP's surrogate, which weights them by :math:`\\tilde w^2`). Its guide-gradient
    variance is lower than IWAE's unless the guide is much narrower than the posterior (below
    :math:`1/\\sqrt2` of its width, where :math:`E_q[w^2]` is infinite).

    References:
        | Doubly Reparameterized Gradient Estimators for Monte Carlo Objectives (Tucker et al., 2018)
        | https://arxiv.org/abs/1810.04152
    """
    log_w = lw.log_w
    value = logmeanexp(log_w, 0)
    weights = normalized_weights(log_w.detach())
    surrogate = (weights**2 * (lw.log_p - _stopped_log_q(lw, "dreg"))).sum(0)
    if lw.log_p_stopped_z is not None:
        surrogate = surrogate + ((weights - weights**2) * lw.log_p_stopped_z).sum(0)
    if lw.log_q_observed is not None:  # a guide-observed log q has IWAE's gradient, weights w~ not w~^2
        surrogate = surrogate - ((weights - weights**2) * lw.log_q_observed).sum(0)
    return _check_shape(replace_grad(value, surrogate), lw)


def cubo(lw: LogWeights, *, n: float = 2.0) -> Tensor:
    """The χ upper bound :math:`\\mathrm{CUBO}_n = \\frac1n \\log \\frac1S \\sum_s w_s^n`.

    An upper bound on :math:`\\log p(x)` in expectation over many particles; its Monte Carlo
    estimate is biased low, badly so when :math:`w` is heavy-tailed (PSIS k̂ > 0.5). The gradient
    is that of the estimate, :math:`\\sum_s \\tilde w^{(n)}_s \\nabla \\log w_s` with
    self-normalized weights :math:`\\tilde w^{(n)} \\propto w^n` (Rényi's estimator at
    :math:`\\alpha = 1 - n`): finite in float32, vanishing at the exact posterior, but biased for
    small ``S``. With a guide far from the posterior and ``S = 8`` we measured it pointing the wrong
    way (a leave-one-out form of Dieng et al.'s unbiased :math:`\\nabla E_q[w^n]` had an error
    bar 1000 times its mean there), so :class:`~pyro_elbo.CUBO` defaults to 64 particles and
    trains only the guide.

    References:
        | Variational Inference via χ Upper Bound Minimization (Dieng et al., 2017)
        | https://arxiv.org/abs/1611.00328
    """
    if n <= 1:
        raise ValueError(f"CUBO needs n > 1 to be an upper bound, got n={n}")
    value = logmeanexp(n * lw.log_w, 0) / n
    if lw.score_sites:  # the leave-one-out score term of iwae, applied to w^n
        value = value + _score_surrogate(lw, n)
    return _check_shape(value, lw)


def vimco(lw: LogWeights) -> Tensor:
    """IWAE with VIMCO's leave-one-out score-function gradient, for discrete latents.

    The score term of particle ``s`` is weighted by :math:`\\hat L - \\hat L_{-s}`, where
    :math:`\\hat L_{-s}` replaces :math:`\\log w_s` by the mean of the other log-weights. Needs
    ``S >= 2``. :func:`iwae` uses the same term for its non-reparameterized sites.

    References:
        | Variational Inference for Monte Carlo Objectives (Mnih & Rezende, 2016)
        | https://arxiv.org/abs/1602.06725
    """
    value = logmeanexp(lw.log_w, 0)
    if lw.score_sites:
        value = value + _score_surrogate(lw, 1.0)
    return _check_shape(value, lw)


# --------------------------------------------------------------------------------------------
# the spec of an estimator


@dataclass(frozen=True)
class Estimator:
    """An estimator and what it needs.

    Attributes:
        fn: ``LogWeights -> [*B]`` bound with the estimator's gradient.
        bound: ``"lower"`` (loss = -bound) or ``"upper"`` (loss = +bound).
        reparameterized_only: refuses non-reparameterized guide sites.
        linear: the value is linear in ``log_w`` (subsampled non-batch plates are then valid).
        min_particles: the smallest ``num_particles`` that makes sense.
        needs: optional :class:`LogWeights` fields to compute.
        trains_model: whether model parameters receive gradients.
        options: default estimator options (``alpha`` for Rényi, ``n`` for CUBO).
    """

    fn: Callable[..., Tensor]
    bound: Literal["lower", "upper"] = "lower"
    reparameterized_only: bool = True
    linear: bool = False
    min_particles: int = 1
    needs: frozenset[str] = field(default_factory=frozenset)
    trains_model: bool = True
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"Estimator.fn must be a function LogWeights -> Tensor, got {self.fn!r}")
        if self.bound not in ("lower", "upper"):
            raise ValueError(f"Estimator.bound must be 'lower' or 'upper', got {self.bound!r}")
        if self.min_particles < 1:
            raise ValueError(f"Estimator.min_particles must be >= 1, got {self.min_particles}")
        object.__setattr__(self, "needs", frozenset(self.needs))

    @property
    def name(self) -> str:
        """The estimator function's name (``"iwae"``, or a user function's name)."""
        return getattr(self.fn, "__name__", type(self.fn).__name__)
