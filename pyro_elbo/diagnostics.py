"""Did variational inference work? The KL gap from both sides, PSIS k̂, gradient SNR, and the
approximation/amortization split.

For a guide :math:`q`, :math:`\\log p(x) = \\mathrm{ELBO}(q) + \\mathrm{KL}(q \\,\\|\\, p(z \\mid x))`.
The ELBO is a lower bound, :math:`\\mathrm{IWAE}_K` a tighter one, :math:`\\mathrm{CUBO}_2` an upper
bound, so

.. math::

    \\mathrm{IWAE}_K - \\mathrm{ELBO} \\;\\le\\; \\mathrm{KL}(q \\,\\|\\, p(z \\mid x))
    \\;\\le\\; \\mathrm{CUBO}_2 - \\mathrm{ELBO}

in expectation. Every number comes with a Monte Carlo standard error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from pyro.ops.stats import fit_generalized_pareto
from torch import Tensor

from pyro_elbo._pyro.inspect import FreeLocalGuide, site_factors
from pyro_elbo._pyro.log_weights import LogWeights, guess_max_plate_nesting, log_weights
from pyro_elbo._pyro.params import loss_and_params
from pyro_elbo._typing import Guide, Model
from pyro_elbo.objectives import ELBO, STL, Objective


@dataclass(frozen=True)
class Estimate:
    """A Monte Carlo estimate and its standard error."""

    value: float
    se: float

    def __str__(self) -> str:
        return f"{self.value:.4f} ± {self.se:.4f}"

    def __sub__(self, other: Estimate) -> Estimate:
        return Estimate(self.value - other.value, math.hypot(self.se, other.se))

    def __add__(self, other: Estimate) -> Estimate:
        return Estimate(self.value + other.value, math.hypot(self.se, other.se))


# --------------------------------------------------------------------------------------------
# PSIS k-hat and ESS


#: fewer distinct values than this in the largest weights means there is no tail to fit
MIN_DISTINCT_TAIL_VALUES = 5


def psis_khat(log_w: Tensor) -> float:
    """Pareto k̂ of the importance weights ``exp(log_w)`` (1-D).

    Fits a generalized Pareto distribution to the largest ``M = min(S/5, 3 sqrt(S))`` weights
    (Pyro's ``fit_generalized_pareto``, after Zhang & Stephens 2009). k̂ < 0.5: the weights have a
    finite variance; 0.5-0.7: usable; > 0.7: too heavy-tailed to trust importance sampling.
    Returns ``-inf`` when the largest weights take fewer than five distinct values (constant
    weights, or a discrete latent with few states): the weights are bounded, with no tail.

    References:
        | Yes, but Did It Work?: Evaluating Variational Inference (Yao et al., 2018)
        | https://arxiv.org/abs/1802.02538
        | Pareto Smoothed Importance Sampling (Vehtari et al., 2024)
        | https://arxiv.org/abs/1507.02646
    """
    log_w = log_w.detach().double().flatten()
    num = log_w.numel()
    if num < 50:
        return math.nan
    log_w = torch.sort(log_w - log_w.max()).values
    tail = int(math.ceil(min(0.2 * num, 3.0 * math.sqrt(num))))
    cutoff = float(log_w[-tail - 1])
    cutoff = max(cutoff, math.log(1e-15))
    tail_values = log_w[log_w > cutoff]
    # A tail of a few repeated values (constant weights, or a discrete latent with a few states)
    # is bounded: there is no Pareto tail to fit, and the fit itself divides by zero on such ties.
    if torch.unique(tail_values).numel() < MIN_DISTINCT_TAIL_VALUES:
        return -math.inf
    k, _ = fit_generalized_pareto(tail_values.exp() - math.exp(cutoff))
    return float(k)


def effective_sample_size(log_w: Tensor) -> float:
    """Kish's importance-sampling ESS :math:`(\\sum w)^2 / \\sum w^2` along dim 0 (summed over
    nothing else: pass a 1-D tensor)."""
    log_w = log_w.detach().double().flatten()
    return float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)))


# --------------------------------------------------------------------------------------------
# the KL-gap report


@dataclass
class KLGapReport:
    """Two-sided bounds on :math:`\\log p(x)` and :math:`\\mathrm{KL}(q \\,\\|\\, p(z \\mid x))`.

    Attributes:
        elbo, cubo: estimates with standard errors.
        iwae: K -> estimate of :math:`E[\\mathrm{IWAE}_K]` for the ladder of K.
        gap_lower, gap_upper: the KL bracket ``IWAE_Kmax - ELBO`` and ``CUBO - ELBO``.
        khat: PSIS k̂ of the importance weights (the worst data point for per-point bounds).
        khat_per_site: latent site -> k̂ of that site's share of the log-weight (its own factor
            and the factors of its children, minus its guide log-density).
        ess: importance effective sample size (of ``num_particles``).
        noise_floor: rounding error of ``log w`` in the working dtype; gaps below it are noise.
        resolvable: whether the upper end of the bracket exceeds the noise floor.
        warnings: why parts of the report should not be trusted.
    """

    num_particles: int
    elbo: Estimate
    iwae: dict[int, Estimate]
    cubo: Estimate
    khat: float
    khat_per_site: dict[str, float]
    ess: float
    noise_floor: float
    dtype: torch.dtype
    num_points: int = 1
    warnings: list[str] = field(default_factory=list)

    @property
    def gap_lower(self) -> Estimate:
        return self.iwae[max(self.iwae)] - self.elbo

    @property
    def gap_upper(self) -> Estimate:
        return self.cubo - self.elbo

    @property
    def resolvable(self) -> bool:
        return self.gap_upper.value > self.noise_floor

    def __str__(self) -> str:
        lines = [f"KL-gap report ({self.num_particles} particles, {str(self.dtype).replace('torch.', '')}"
                 + (f", {self.num_points} data points" if self.num_points > 1 else "") + ")", ""]
        lines.append(f"  {'bound':<12}{'estimate':>14}{'std. error':>13}")
        lines.append(f"  {'ELBO':<12}{self.elbo.value:>14.4f}{self.elbo.se:>13.4f}")
        for k, est in self.iwae.items():
            if k > 1:
                lines.append(f"  {'IWAE_' + str(k):<12}{est.value:>14.4f}{est.se:>13.4f}")
        lines.append(f"  {'CUBO_2':<12}{self.cubo.value:>14.4f}{self.cubo.se:>13.4f}")
        lines.append("")
        top = max(self.iwae)
        lines.append(f"  log p(x) in [{self.iwae[top].value:.4f}, {self.cubo.value:.4f}]")
        if self.resolvable:
            lines.append(
                f"  KL(q || p)  in [{self.gap_lower.value:.4f}, {self.gap_upper.value:.4f}]"
                f"  (± {self.gap_lower.se:.4f}, ± {self.gap_upper.se:.4f})"
            )
        else:
            lines.append(f"  KL(q || p)  not resolvable: below the {self.noise_floor:.2g} nat rounding noise floor")
        lines.append(f"  PSIS k-hat  {self.khat:.3f}   {_khat_verdict(self.khat)}")
        lines.append(f"  ESS         {self.ess:.1f} of {self.num_particles}")
        if self.khat_per_site:
            lines.append("  k-hat per site:")
            for site, k in sorted(self.khat_per_site.items(), key=lambda kv: -_finite(kv[1])):
                lines.append(f"    {site:<20}{k:>8.3f}   {_khat_verdict(k)}")
        for message in self.warnings:
            lines.append(f"  warning: {message}")
        return "\n".join(lines)

    def plot(self, ax: Any = None) -> Any:
        """Bounds against K with 2-SE error bars, and the bracket of log p(x). Returns the figure."""
        import matplotlib

        if ax is None:
            matplotlib.use(matplotlib.get_backend())
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(6, 4))
        else:
            fig = ax.figure
        ks = sorted(self.iwae)
        values = [self.iwae[k].value for k in ks]
        errors = [2 * self.iwae[k].se for k in ks]
        ax.errorbar(ks, values, yerr=errors, marker="o", capsize=3, label="IWAE$_K$ (lower bounds)")
        ax.axhline(self.elbo.value, color="C2", ls="--", label=f"ELBO = {self.elbo.value:.3f}")
        ax.axhline(self.cubo.value, color="C3", ls="--", label=f"CUBO$_2$ = {self.cubo.value:.3f}")
        ax.axhspan(values[-1], self.cubo.value, color="C1", alpha=0.15, label="log p(x) bracket")
        ax.set_xscale("log")
        ax.set_xlabel("K (particles per bound)")
        ax.set_ylabel("nats")
        ax.set_title(f"KL(q‖p) ∈ [{self.gap_lower.value:.3f}, {self.gap_upper.value:.3f}],  k̂ = {self.khat:.2f}")
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        return fig


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -1e9


def _khat_verdict(k: float) -> str:
    if not math.isfinite(k):
        return "(no tail: the weights are bounded)" if k < 0 else ""
    if k < 0.5:
        return "good"
    if k < 0.7:
        return "ok (CUBO biased low)"
    return "BAD: importance weights too heavy-tailed"


def kl_gap(
    model: Model,
    guide: Guide,
    *args: Any,
    num_particles: int = 10_000,
    chunk_size: int = 1000,
    ladder: tuple[int, ...] | None = None,
    max_plate_nesting: int | None = None,
    vectorize_particles: bool = True,
    per_site: bool = True,
    **kwargs: Any,
) -> KLGapReport:
    """Bracket :math:`\\log p(x)` and :math:`\\mathrm{KL}(q \\,\\|\\, p(z\\mid x))` from both sides.

    Particles are drawn ``chunk_size`` at a time without gradients; only their log-weights are
    kept, so memory is ``O(chunk_size x model)`` for the traces plus ``8 x num_particles x |B|``
    bytes for the log-weights (``|B|`` data points when every site is in the data plate, else 1):
    ``num_particles=10**6`` takes 8 MB for a joint bound.

    Standard errors: ELBO from the particle variance; ``IWAE_K`` (K < S) from the spread of its
    ``S // K`` independent group estimates; ``IWAE_S`` and ``CUBO_2`` by the delta method, which is
    unreliable when k̂ > 0.5 (the report warns). Per-data-point bounds are summed over points.

    Args:
        model, guide, *args, **kwargs: as for :func:`~pyro_elbo.log_weights`.
        num_particles: ``S``, total particles.
        chunk_size: particles per vectorized pass.
        ladder: the K of the IWAE ladder (default 1, 10, 100, ... up to S).
        per_site: also compute k̂ per latent site (one dependency analysis of the model).

    Returns:
        A :class:`KLGapReport`; ``print(report)`` shows a table and ``report.plot()`` a figure.

    References:
        | Importance Weighted Autoencoders (Burda et al., 2016) https://arxiv.org/abs/1509.00519
        | Variational Inference via χ Upper Bound Minimization (Dieng et al., 2017)
        | https://arxiv.org/abs/1611.00328
        | Yes, but Did It Work?: Evaluating Variational Inference (Yao et al., 2018)
        | https://arxiv.org/abs/1802.02538
    """
    if num_particles < 2:
        raise ValueError(f"kl_gap needs num_particles >= 2, got {num_particles}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if max_plate_nesting is None:
        max_plate_nesting = guess_max_plate_nesting(model, guide, *args, **kwargs)
    factors = site_factors(model, args, kwargs) if per_site else {}
    log_w_chunks: list[Tensor] = []
    share_chunks: dict[str, list[Tensor]] = {site: [] for site in factors}
    abs_terms = 0.0
    dtype = torch.get_default_dtype()
    drawn = 0
    with torch.no_grad():
        while drawn < num_particles:
            size = min(chunk_size, num_particles - drawn)
            lw = log_weights(
                model,
                guide,
                *args,
                num_particles=size,
                max_plate_nesting=max_plate_nesting,
                vectorize_particles=vectorize_particles,
                need={"per_site"} if factors else set(),
                **kwargs,
            )
            if lw.batch_scale != 1.0 or lw.subsampled_plates:
                plates = list(lw.subsampled_plates) or list(lw.batch_plates)
                raise ValueError(
                    f"kl_gap needs the full data set, but plate(s) {plates} are subsampled: each chunk of "
                    "particles would see different data points. Pass subsample_size=None / all the data."
                )
            dtype = lw.log_p.dtype
            log_w_chunks.append(lw.log_w.double().reshape(size, -1).cpu())
            abs_terms += float(lw.log_p.abs().sum() + lw.log_q.abs().sum())
            for site, children in factors.items():
                share = lw.site_log_p[site] - lw.site_log_q[site]
                for child in children:
                    share = share + lw.site_log_p[child]
                share_chunks[site].append(share.double().reshape(size, -1).cpu())
            drawn += size
    log_w = torch.cat(log_w_chunks)  # [S, points]
    num_points = log_w.shape[1]
    ladder = _ladder(num_particles) if ladder is None else tuple(sorted(set(ladder)))
    if any(k < 1 or k > num_particles for k in ladder):
        raise ValueError(f"ladder values must be in [1, {num_particles}], got {ladder}")

    elbo = _elbo_estimate(log_w)
    iwae = {1: elbo}
    for k in ladder:
        if k > 1:
            iwae[k] = _iwae_estimate(log_w, k)
    cubo = _power_mean_estimate(log_w, 2.0)
    khats = [psis_khat(log_w[:, b]) for b in range(num_points)]
    khat = max(khats, key=_finite)
    ess = min(effective_sample_size(log_w[:, b]) for b in range(num_points))
    khat_per_site = {
        site: max((psis_khat(s[:, b]) for b in range(s.shape[1])), key=_finite)
        for site, s in ((site, torch.cat(chunks)) for site, chunks in share_chunks.items())
    }
    eps = torch.finfo(dtype).eps
    noise_floor = 4 * eps * abs_terms / num_particles + 1e-300
    report = KLGapReport(
        num_particles=num_particles,
        elbo=elbo,
        iwae=iwae,
        cubo=cubo,
        khat=khat,
        khat_per_site=khat_per_site,
        ess=ess,
        noise_floor=noise_floor,
        dtype=dtype,
        num_points=num_points,
    )
    if khat > 0.7:
        report.warnings.append(
            f"k-hat {khat:.2f} > 0.7: the guide is far from the posterior and IWAE/CUBO are unreliable; "
            "the true KL may lie outside the bracket"
        )
    elif khat > 0.5:
        report.warnings.append(
            f"k-hat {khat:.2f} > 0.5: w^2 has infinite variance, so the CUBO estimate (upper end) is biased low"
        )
    if not report.resolvable:
        report.warnings.append("the KL gap is below the floating-point noise floor: the guide is exact to rounding")
    return report


def _ladder(num: int) -> tuple[int, ...]:
    ks, k = [1], 10
    while k < num:
        ks.append(k)
        k *= 10
    ks.append(num)
    return tuple(ks)


def _sum_points(values: Tensor, variances: Tensor) -> Estimate:
    return Estimate(float(values.sum()), float(variances.sum().clamp_min(0).sqrt()))


def _elbo_estimate(log_w: Tensor) -> Estimate:
    """Mean log-weight per point ([S, points]), summed over points, with its standard error."""
    return _sum_points(log_w.mean(0), log_w.var(0) / log_w.shape[0])


def _iwae_estimate(log_w: Tensor, k: int) -> Estimate:
    num = log_w.shape[0]
    groups = num // k
    if groups >= 2:
        grouped = log_w[: groups * k].reshape(groups, k, -1)
        estimates = torch.logsumexp(grouped, 1) - math.log(k)  # [groups, points]
        return _sum_points(estimates.mean(0), estimates.var(0) / groups)
    return _power_mean_estimate(log_w[:k], 1.0)


def _power_mean_estimate(log_w: Tensor, n: float) -> Estimate:
    """:math:`\\frac1n\\log\\frac1S\\sum w^n` with a delta-method standard error."""
    num = log_w.shape[0]
    scaled = n * log_w
    value = (torch.logsumexp(scaled, 0) - math.log(num)) / n
    ratio = torch.exp(scaled - torch.logsumexp(scaled, 0) + math.log(num))  # w^n / mean(w^n)
    variance = ratio.var(0) / num / n**2
    return _sum_points(value, variance)


# --------------------------------------------------------------------------------------------
# gradient SNR


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

    References:
        | Tighter Variational Bounds are Not Necessarily Better (Rainforth et al., 2018)
        | https://arxiv.org/abs/1802.04537
    """
    objective = ELBO() if objective is None else objective
    if num_samples < 2:
        raise ValueError(f"gradient_snr needs num_samples >= 2, got {num_samples}")
    draws: dict[str, list[Tensor]] = {}
    for _ in range(num_samples):
        loss, params = loss_and_params(lambda: objective.differentiable_loss(model, guide, *args, **kwargs))
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for name, param, grad in zip(params, params.values(), grads):
            draws.setdefault(name, []).append(torch.zeros_like(param) if grad is None else grad.detach())
    result = {}
    for name, values in draws.items():
        stacked = torch.stack(values)
        result[name] = stacked.mean(0).abs() / stacked.std(0).clamp_min(torch.finfo(stacked.dtype).tiny)
    return result


# --------------------------------------------------------------------------------------------
# approximation vs amortization gap


@dataclass(frozen=True)
class GapDecomposition:
    """Cremer et al.'s split of the inference gap ``log p(x) - ELBO(q_phi)``.

    ``approximation = log p(x) - ELBO(q*)``: what the variational family cannot express even with
    free parameters per data point; ``amortization = ELBO(q*) - ELBO(q_phi)``: what the shared
    encoder loses. ``approximation + amortization == total``.
    """

    log_evidence: Estimate
    elbo_amortized: Estimate
    elbo_optimal: Estimate
    total: Estimate
    approximation: Estimate
    amortization: Estimate

    def __str__(self) -> str:
        return "\n".join(
            [
                "Inference-gap decomposition (Cremer et al. 2018)",
                f"  log p(x) (IWAE, best proposal)  {self.log_evidence}",
                f"  ELBO, amortized guide           {self.elbo_amortized}",
                f"  ELBO, optimal local guide       {self.elbo_optimal}",
                f"  total gap                       {self.total}",
                f"    approximation gap             {self.approximation}",
                f"    amortization gap              {self.amortization}",
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
    **kwargs: Any,
) -> GapDecomposition:
    """Approximation gap vs amortization gap of an amortized guide.

    The guide's local distributions (every latent site inside the data plate) are replaced by the
    same distribution families with free parameters per data point, initialized at the amortized
    values and optimized with Adam on the ELBO with STL gradients (``num_steps`` steps,
    ``train_particles`` particles, learning rate decayed 100-fold): this is :math:`q^*`. Then ``log p(x)`` is estimated with IWAE over
    ``num_particles`` particles from the better of the two proposals, and both ELBOs with
    ``num_particles`` particles.

    Raises:
        ValueError: if the guide has no local latents (nothing is amortized).
        NotImplementedError: for a guide distribution whose parameters cannot be freed.

    References:
        | Inference Suboptimality in Variational Autoencoders (Cremer, Li & Duvenaud, 2018)
        | https://arxiv.org/abs/1801.03558
    """
    max_plate_nesting = guess_max_plate_nesting(model, guide, *args, **kwargs)
    with torch.no_grad():
        probe = log_weights(model, guide, *args, num_particles=1, max_plate_nesting=max_plate_nesting, **kwargs)
    if not probe.batch_plates:
        raise ValueError(
            "gap_decomposition needs an amortized guide: every latent site inside a data plate, so "
            "that each data point has its own local posterior; this model's bound is joint."
        )
    local = FreeLocalGuide(guide, args, kwargs)
    optim = torch.optim.Adam(local.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optim, gamma=0.01 ** (1 / max(num_steps, 1)))
    # STL's gradient vanishes at the optimum when the family contains the posterior, so q* is
    # found to high precision; score-function sites need the ELBO's estimator.
    cls = ELBO if probe.score_sites else STL
    objective = cls(num_particles=train_particles, max_plate_nesting=max_plate_nesting)
    for _ in range(num_steps):
        optim.zero_grad()
        objective.differentiable_loss(model, local, *args, **kwargs).backward()
        optim.step()
        schedule.step()

    def bounds(g: Guide) -> tuple[Estimate, Estimate]:
        with torch.no_grad():
            lw = log_weights(model, g, *args, num_particles=num_particles, max_plate_nesting=max_plate_nesting, **kwargs)
        log_w = lw.log_w.double().reshape(num_particles, -1).cpu()
        return _elbo_estimate(log_w), _power_mean_estimate(log_w, 1.0)

    elbo_amortized, iwae_amortized = bounds(guide)
    elbo_optimal, iwae_optimal = bounds(local)
    log_evidence = max(iwae_amortized, iwae_optimal, key=lambda e: e.value)
    total = log_evidence - elbo_amortized
    approximation = log_evidence - elbo_optimal
    amortization = elbo_optimal - elbo_amortized
    return GapDecomposition(log_evidence, elbo_amortized, elbo_optimal, total, approximation, amortization)


__all__ = [
    "Estimate",
    "GapDecomposition",
    "KLGapReport",
    "LogWeights",
    "effective_sample_size",
    "gap_decomposition",
    "gradient_snr",
    "kl_gap",
    "psis_khat",
]
