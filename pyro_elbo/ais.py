"""Annealed importance sampling from a guide to the posterior; the math only, no Pyro.

Along the geometric path :math:`\\pi_\\beta(z) \\propto q(z)^{1-\\beta}\\, p(x, z)^{\\beta}`,
:math:`0 = \\beta_0 < \\dots < \\beta_T = 1`, chains start at :math:`z_0 \\sim q` and move by
MCMC kernels :math:`K_t` that leave :math:`\\pi_{\\beta_t}` invariant. The weight

.. math::

    \\log w = \\sum_{t=1}^{T} (\\beta_t - \\beta_{t-1})\\,
        \\bigl[\\log p(x, z_{t-1}) - \\log q(z_{t-1})\\bigr]

has :math:`\\mathbb{E}[w] = p(x)`, so :math:`\\log \\frac1C \\sum_c w_c` is a stochastic lower
bound. Run backwards from an exact posterior draw (:math:`\\beta` from 1 to 0), the same sum
estimates :math:`1/p(x)` without bias, and minus its log-mean is a stochastic *upper* bound: the
two runs are bidirectional Monte Carlo (BDMC).

Kernels are HMC (MALA is HMC with one leapfrog step) in the guide's unconstrained space, with a
diagonal mass matrix from the guide's spread. Every tensor is ``[C, *B]`` (chains, data points)
or a dict of site tensors that broadcast against it, so each data point anneals on its own, with
its own step size.

Step sizes are tuned in a separate *pilot* run (Robbins-Monro on the acceptance rate, as Wu et
al. 2017 do online) and then frozen: the kernels of the reported run do not depend on its own
chains, so its estimate stays unbiased.

References:
    | Annealed Importance Sampling (Neal, 2001)
    | https://arxiv.org/abs/physics/9803008
    | On the Quantitative Analysis of Decoder-Based Generative Models (Wu et al., 2017)
    | https://arxiv.org/abs/1611.04273
    | Sandwiching the marginal likelihood using bidirectional Monte Carlo (Grosse et al., 2015)
    | https://arxiv.org/abs/1511.02543
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

Sites = dict[str, Tensor]


class Target(Protocol):
    """What AIS needs from a model: log densities of unconstrained latents and their shapes."""

    def log_densities(self, u: Sites) -> tuple[Tensor, Tensor, Tensor]: ...

    def reduce(self, tensor: Tensor, event_dim: int = 0) -> Tensor: ...

    def broadcast(self, tensor: Tensor, like: Tensor) -> Tensor: ...

    def event_dim(self, value: Tensor) -> int: ...


def sigmoid_schedule(num_steps: int, delta: float = 4.0) -> Tensor:
    """``num_steps + 1`` inverse temperatures from 0 to 1, dense at both ends:
    :math:`\\beta_t \\propto \\sigma(\\delta (2t/T - 1))`, rescaled to [0, 1] (Grosse et al., 2015)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    s = torch.sigmoid(delta * (2 * torch.arange(num_steps + 1, dtype=torch.float64) / num_steps - 1))
    return (s - s[0]) / (s[-1] - s[0])


@dataclass
class _State:
    """Chains at one point, with the two parts of their log density and its gradients:
    :math:`\\log \\pi_\\beta = \\text{base} + \\beta f` with base = log q + log|J|, f = log p - log q."""

    u: Sites
    base: Tensor
    f: Tensor
    grad_base: Sites
    grad_f: Sites


def _evaluate(target: Target, u: Sites) -> _State:
    with torch.enable_grad():
        leaves = {k: v.detach().requires_grad_(True) for k, v in u.items()}
        log_p, log_q, log_det = target.log_densities(leaves)
        base, f = log_q + log_det, log_p - log_q
        names = list(leaves)
        inputs = [leaves[k] for k in names]
        g_base = torch.autograd.grad(base.sum(), inputs, retain_graph=True, allow_unused=True)
        g_f = torch.autograd.grad(f.sum(), inputs, allow_unused=True)
    zero = {k: torch.zeros_like(v) for k, v in leaves.items()}
    return _State(
        {k: v.detach() for k, v in leaves.items()},
        base.detach(),
        f.detach(),
        {k: zero[k] if g is None else g for k, g in zip(names, g_base)},
        {k: zero[k] if g is None else g for k, g in zip(names, g_f)},
    )


def _select(target: Target, accept: Tensor, new: _State, old: _State) -> _State:
    def pick(a: Sites, b: Sites) -> Sites:
        return {k: torch.where(target.broadcast(accept, a[k]), a[k], b[k]) for k in a}

    return _State(
        pick(new.u, old.u),
        torch.where(accept, new.base, old.base),
        torch.where(accept, new.f, old.f),
        pick(new.grad_base, old.grad_base),
        pick(new.grad_f, old.grad_f),
    )


def hmc_step(
    target: Target, state: _State, beta: float, step_size: Tensor, scale: Sites, num_leapfrog: int
) -> tuple[_State, Tensor]:
    """One HMC transition leaving :math:`\\pi_\\beta` invariant, for every chain and data point.

    Momentum :math:`r \\sim N(0, M)` with :math:`M^{-1} = \\mathrm{diag}(\\text{scale}^2)`; leapfrog
    with step ``step_size`` (``[1, *B]``) times a uniform jitter in [0.8, 1.2] per chain (drawn
    independently of the state, so invariance holds), then a Metropolis test per chain and point.

    Returns:
        The new state and the acceptance probabilities ``[C, *B]``.
    """

    def grad(s: _State) -> Sites:
        return {k: s.grad_base[k] + beta * s.grad_f[k] for k in s.u}

    def kinetic(r: Sites) -> Tensor:
        return sum(  # type: ignore[return-value]
            target.reduce(0.5 * (scale[k] * r[k]) ** 2, target.event_dim(r[k])) for k in r
        )

    jitter = 0.8 + 0.4 * torch.rand_like(state.f)  # random trajectory lengths avoid periodic orbits
    eps = {k: target.broadcast(step_size * jitter, v) for k, v in state.u.items()}
    r = {k: torch.randn_like(v) / scale[k] for k, v in state.u.items()}
    h0 = -(state.base + beta * state.f) + kinetic(r)
    new, g = state, grad(state)
    for _ in range(num_leapfrog):
        r = {k: r[k] + 0.5 * eps[k] * g[k] for k in r}
        new = _evaluate(target, {k: new.u[k] + eps[k] * scale[k] ** 2 * r[k] for k in r})
        g = grad(new)
        r = {k: r[k] + 0.5 * eps[k] * g[k] for k in r}
    h1 = -(new.base + beta * new.f) + kinetic(r)
    log_accept = (h0 - h1).clamp(max=0.0)
    prob = torch.where(torch.isfinite(log_accept), log_accept.exp(), torch.zeros_like(log_accept))
    accept = torch.rand_like(prob) < prob
    return _select(target, accept, new, state), prob


@dataclass(frozen=True)
class AISRun:
    """One annealing run.

    Attributes:
        log_w: ``[C, *B]`` log weights (forward: estimates of p(x); reverse: of 1/p(x)).
        acceptance: ``[T, *B]`` mean acceptance probability per temperature and data point.
        step_size: ``[T, *B]`` the step sizes used.
        final: the chains' final unconstrained states.
        num_evals: density-and-gradient evaluations per chain.
    """

    log_w: Tensor
    acceptance: Tensor
    step_size: Tensor
    final: Sites
    num_evals: int


def anneal(
    target: Target,
    u0: Sites,
    betas: Tensor,
    step_size: Tensor,
    scale: Sites,
    *,
    num_leapfrog: int = 5,
    adapt: bool = False,
    target_accept: float = 0.65,
) -> AISRun:
    """Run AIS along ``betas`` (increasing: forward; decreasing: reverse) from chains at ``u0``.

    Args:
        target: the model's log densities (see :class:`Target`).
        u0: initial unconstrained states, ``q`` draws (forward) or exact posterior draws (reverse).
        betas: ``[T + 1]`` inverse temperatures, from ``betas[0]`` to ``betas[-1]``.
        step_size: ``[T, *B]`` one step size per transition and data point, or ``[*B]`` (then
            ``adapt=True`` tunes it along the way, for a pilot run).
        scale: per-site standard deviations of the unconstrained latents under ``q`` (the
            inverse mass matrix's square root).
        num_leapfrog: leapfrog steps per HMC transition (1 is MALA).
        adapt: multiply the step size by :math:`\\exp(\\bar a - a^*)` after each transition,
            where :math:`\\bar a` is the chains' mean acceptance; biased, so only for a pilot.
        target_accept: :math:`a^*`.
    """
    state = _evaluate(target, u0)
    log_w = torch.zeros_like(state.f)
    eps = step_size
    steps, accepts = [], []
    for t in range(1, len(betas)):
        beta = float(betas[t])
        log_w = log_w + float(betas[t] - betas[t - 1]) * state.f
        current = eps if adapt else step_size[t - 1]
        state, prob = hmc_step(target, state, beta, current.unsqueeze(0), scale, num_leapfrog)
        mean_accept = prob.mean(0)
        steps.append(current)
        accepts.append(mean_accept)
        if adapt:
            eps = current * torch.exp(mean_accept - target_accept)
    num_evals = 1 + (len(betas) - 1) * num_leapfrog
    return AISRun(log_w, torch.stack(accepts), torch.stack(steps), state.u, num_evals)


def mcmc(
    target: Target, u0: Sites, beta: float, step_size: Tensor, scale: Sites, *, num_leapfrog: int, num_transitions: int
) -> tuple[Sites, Tensor]:
    """``num_transitions`` HMC moves leaving :math:`\\pi_\\beta` invariant, without annealing.

    Chains started at one exact posterior draw and moved so (``beta = 1``) are each still an exact
    draw, but no longer the same one: the reverse AIS chains of BDMC then start spread over the
    posterior, and the spread of their weights measures the variability due to the start.

    Returns:
        The final states and the mean acceptance probability ``[*B]``.
    """
    state = _evaluate(target, u0)
    accepts = [torch.ones_like(state.f[0])]
    for _ in range(num_transitions):
        state, prob = hmc_step(target, state, beta, step_size.unsqueeze(0), scale, num_leapfrog)
        accepts.append(prob.mean(0))
    return state.u, torch.stack(accepts[1:] or accepts).mean(0)


def effective_chains(log_w: Tensor) -> Tensor:
    """:math:`(\\sum_c w_c)^2 / \\sum_c w_c^2` over dim 0: how many chains carry the weight."""
    return 1.0 / torch.softmax(log_w, 0).pow(2).sum(0)


def logmeanexp(x: Tensor, dim: int = 0) -> Tensor:
    return torch.logsumexp(x, dim) - math.log(x.shape[dim])


def log_mean_se(log_w: Tensor) -> Tensor:
    """Delta-method standard error of :math:`\\log \\frac1C\\sum_c w_c` over dim 0:
    :math:`\\mathrm{sd}(w) / (\\sqrt{C}\\, \\bar w)`, computed from normalized weights."""
    num = log_w.shape[0]
    if num < 2:
        return torch.full_like(log_w[0], math.nan)
    w = torch.softmax(log_w, 0)
    ratio = (num * (w**2).sum(0) - 1).clamp(min=0.0) * num / (num - 1)  # var(w) / mean(w)^2
    return (ratio / num).sqrt()
