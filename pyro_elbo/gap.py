"""Approximation gap vs amortization gap of an amortized guide (Cremer et al., 2018)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from pyro_elbo._pyro.inspect import FreeLocalGuide, raise_if_nonfinite_observed
from pyro_elbo._pyro.log_weights import guess_max_plate_nesting, log_weights
from pyro_elbo._random import forked_rng
from pyro_elbo._typing import Guide, Model
from pyro_elbo.kl_gap import Estimate, _elbo_estimate, _power_mean_estimate
from pyro_elbo.objectives import ELBO, STL, Objective

#: particles of the common-random-numbers ELBO that checks each round's improvement
CHECK_PARTICLES = 1000


@dataclass(frozen=True)
class GapDecomposition:
    """Cremer et al.'s split of the inference gap ``log p(x) - ELBO(q_phi)``.

    ``approximation = log p(x) - ELBO(q*)``: what the variational family cannot express even with
    free parameters per data point; ``amortization = ELBO(q*) - ELBO(q_phi)``: what the shared
    encoder loses. ``approximation + amortization == total``. When the optimization of ``q*`` did
    not converge (``converged=False``), ``ELBO(q*)`` is too low: the approximation gap is too large
    and the amortization gap too small, and the printout says "not converged" instead of them.

    Attributes:
        num_steps: optimization steps run for ``q*``.
        last_improvement: how much the last round raised ``ELBO(q*)`` (common random numbers).
    """

    log_evidence: Estimate
    elbo_amortized: Estimate
    elbo_optimal: Estimate
    total: Estimate
    approximation: Estimate
    amortization: Estimate
    converged: bool = True
    num_steps: int = 0
    last_improvement: float = 0.0

    def __str__(self) -> str:
        split = [
            f"    approximation gap             {self.approximation}",
            f"    amortization gap              {self.amortization}",
        ]
        if not self.converged:
            split = [
                f"    approximation / amortization  not converged: the local guide q* still improved by "
                f"{self.last_improvement:.3g} nats in the last round ({self.num_steps} steps in all); "
                "raise max_steps"
            ]
        return "\n".join(
            [
                "Inference-gap decomposition (Cremer et al. 2018)",
                f"  log p(x) (IWAE, best proposal)  {self.log_evidence}",
                f"  ELBO, amortized guide           {self.elbo_amortized}",
                f"  ELBO, optimal local guide       {self.elbo_optimal}"
                + ("" if self.converged else " (not converged)"),
                f"  total gap                       {self.total}",
                *split,
            ]
        )


def gap_decomposition(
    model: Model,
    guide: Guide,
    *args: Any,
    num_particles: int = 1000,
    num_steps: int = 500,
    lr: float = 0.05,
    train_particles: int = 8,
    max_steps: int = 20_000,
    tol: float = 0.01,
    **kwargs: Any,
) -> GapDecomposition:
    """Approximation gap vs amortization gap of an amortized guide.

    The guide's local distributions (every latent site inside the data plate) are replaced by the
    same distribution families with free parameters per data point, initialized at the amortized
    values and optimized with Adam on the ELBO with STL gradients: this is :math:`q^*`. The
    optimization runs in rounds of ``num_steps`` steps (learning rate ``lr`` decayed 100-fold in
    each round) until a round raises ``ELBO(q*)`` by less than ``tol`` nats, measured with the same
    ``1000`` particles' noise before and after (common random numbers), or until ``max_steps``.
    Then ``log p(x)`` is estimated with IWAE over ``num_particles`` particles from the better of
    the two proposals, and both ELBOs with ``num_particles`` particles.

    Raises:
        ValueError: if the guide has no local latents (nothing is amortized), or observed data
            holds ``inf``/``nan`` (names the site).
        NotImplementedError: for a guide distribution whose parameters cannot be freed.

    References:
        | Inference Suboptimality in Variational Autoencoders (Cremer, Li & Duvenaud, 2018)
        | https://arxiv.org/abs/1801.03558
    """
    raise_if_nonfinite_observed(model, guide, args, kwargs, caller="gap_decomposition")
    max_plate_nesting = guess_max_plate_nesting(model, guide, *args, **kwargs)
    with torch.no_grad():
        probe = log_weights(model, guide, *args, num_particles=1, max_plate_nesting=max_plate_nesting, **kwargs)
    if not probe.batch_plates:
        raise ValueError(
            "gap_decomposition needs an amortized guide: every latent site inside a data plate, so "
            "that each data point has its own local posterior; this model's bound is joint."
        )
    local = FreeLocalGuide(guide, args, kwargs)
    # STL's gradient vanishes at the optimum when the family contains the posterior, so q* is
    # found to high precision; score-function sites need the ELBO's estimator.
    cls = ELBO if probe.score_sites else STL
    objective = cls(num_particles=train_particles, max_plate_nesting=max_plate_nesting)

    def check() -> float:  # the same noise every time: differences are the parameters' doing
        with forked_rng(), torch.no_grad():
            torch.manual_seed(20180)
            lw = log_weights(
                model, local, *args, num_particles=CHECK_PARTICLES, max_plate_nesting=max_plate_nesting, **kwargs
            )
        return float(lw.log_w.double().mean(0).sum())

    steps, improvement, before = 0, math.inf, check()
    while steps < max_steps and improvement > tol:
        _optimize(objective, model, local, args, kwargs, min(num_steps, max_steps - steps), lr)
        steps += min(num_steps, max_steps - steps)
        after = check()
        improvement, before = after - before, after

    def bounds(g: Guide) -> tuple[Estimate, Estimate]:
        with torch.no_grad():
            lw = log_weights(
                model, g, *args, num_particles=num_particles, max_plate_nesting=max_plate_nesting, **kwargs
            )
        log_w = lw.log_w.double().reshape(num_particles, -1).cpu()
        return _elbo_estimate(log_w), _power_mean_estimate(log_w, 1.0)

    elbo_amortized, iwae_amortized = bounds(guide)
    elbo_optimal, iwae_optimal = bounds(local)
    log_evidence = max(iwae_amortized, iwae_optimal, key=lambda e: e.value)
    return GapDecomposition(
        log_evidence,
        elbo_amortized,
        elbo_optimal,
        log_evidence - elbo_amortized,
        log_evidence - elbo_optimal,
        elbo_optimal - elbo_amortized,
        converged=improvement <= tol,
        num_steps=steps,
        last_improvement=improvement,
    )


def _optimize(
    objective: Objective,
    model: Model,
    local: FreeLocalGuide,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    num_steps: int,
    lr: float,
) -> None:
    """One round: Adam with the learning rate decayed 100-fold over ``num_steps``."""
    optim = torch.optim.Adam(local.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optim, gamma=0.01 ** (1 / max(num_steps, 1)))
    for _ in range(num_steps):
        optim.zero_grad()
        objective.differentiable_loss(model, local, *args, **kwargs).backward()
        optim.step()
        schedule.step()


__all__ = ["GapDecomposition", "gap_decomposition"]
