"""Did variational inference work? :math:`\\log p(x)` and the KL gap bracketed from both sides.

For a guide :math:`q`, :math:`\\log p(x) = \\mathrm{ELBO}(q) + \\mathrm{KL}(q \\,\\|\\, p(z \\mid x))`.
The ELBO is a lower bound, :math:`\\mathrm{IWAE}_K` a tighter one, :math:`\\mathrm{CUBO}_2` an upper
bound, so

.. math::

    \\mathrm{IWAE}_K - \\mathrm{ELBO} \\;\\le\\; \\mathrm{KL}(q \\,\\|\\, p(z \\mid x))
    \\;\\le\\; \\mathrm{CUBO}_2 - \\mathrm{ELBO}

in expectation. Every number comes with a Monte Carlo standard error; the printed intervals are
the bounds widened by two standard errors and by the floating-point noise floor, and the verdict
says whether the importance-sampling numbers (IWAE, CUBO) can be trusted at all.

With ``bdmc=True``, the same on data simulated from the model, split by BDMC into q's KL and the
estimators' looseness (:class:`SimulatedGap`; Grosse et al., 2015).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pyro_elbo import evidence
from pyro_elbo._estimate import Estimate
from pyro_elbo._pyro.enum import MARGINAL_PREFIX
from pyro_elbo._pyro.inspect import SiteShares, float64_rounding_error, raise_if_nonfinite_observed, site_shares
from pyro_elbo._pyro.log_weights import guess_max_plate_nesting, log_weights
from pyro_elbo._typing import Guide, Model
from pyro_elbo.psis import effective_sample_size, psis_khat

#: below this many effective particles, importance sampling is unreliable whatever k̂ says
MIN_ESS = 20.0
#: half the variance of log w (the KL to second order) at most this: q matches the posterior's bulk
SMALL_KL = 0.05
#: the upper end of the KL interval at most this (nats) for the verdict "good"
GOOD_KL = 1.0
#: particles re-evaluated in float64 to measure the rounding error of the log-weights
ROUNDING_PARTICLES = 64
#: the measured rounding-error range over ROUNDING_PARTICLES, times this, is the noise floor
#: (the range of S >> 64 Gaussian errors is at most ~1.7x that of 64; 2x leaves room for tails)
ROUNDING_SAFETY = 2.0
#: error bars of the printed intervals, in standard errors
Z = 2.0


@dataclass
class KLGapReport:
    """Two-sided bounds on :math:`\\log p(x)` and :math:`\\mathrm{KL}(q \\,\\|\\, p(z \\mid x))`.

    Attributes:
        elbo, cubo: estimates with standard errors.
        iwae: K -> estimate of :math:`E[\\mathrm{IWAE}_K]` for the ladder of K.
        gap_lower, gap_upper: the KL bracket ``IWAE_Kmax - ELBO`` and ``CUBO - ELBO``.
        kl_interval, log_evidence_interval: what the report stands behind: each bound widened
            by two standard errors and the noise floor (upper end ``inf`` when unreliable).
        khat: PSIS k̂ of the importance weights (the worst data point for per-point bounds).
        khat_per_site: latent site -> k̂ of that site's share of the log-weight (its own factor
            and its children's, minus its guide density including its auxiliary guide sites).
        joint_sites: latent sites left out of ``khat_per_site``: their guide density is joint
            (e.g. ``AutoMultivariateNormal``), latent -> the shared auxiliary sites.
        ess: importance effective sample size (of ``num_particles``; the worst data point).
        log_w_sd: standard deviation of ``log w`` (summed over data points); ``log_w_sd**2 / 2``
            is the KL to second order.
        noise_floor: bound on the rounding error of the gaps, in nats (see ``floor_source``).
        resolvable: whether the upper end of the bracket exceeds the noise floor.
        reliable: k̂ < 0.7 and ESS >= ``MIN_ESS``: IWAE and CUBO and their errors can be trusted.
        verdict: one line; warnings: why parts of the report should not be trusted.
        simulated: with ``bdmc``, the bracket on data simulated from the model, split into q's KL
            and the estimators' looseness by a BDMC sandwich (:class:`SimulatedGap`).
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
    log_w_sd: float = math.nan
    floor_source: str = "magnitudes"
    joint_sites: dict[str, list[str]] = field(default_factory=dict)
    verdict: str = ""
    warnings: list[str] = field(default_factory=list)
    simulated: SimulatedGap | None = None

    @property
    def gap_lower(self) -> Estimate:
        return self.iwae[max(self.iwae)] - self.elbo

    @property
    def gap_upper(self) -> Estimate:
        return self.cubo - self.elbo

    @property
    def resolvable(self) -> bool:
        return self.gap_upper.value > self.noise_floor

    @property
    def reliable(self) -> bool:
        return bool(self.khat < 0.7 and self.ess >= MIN_ESS)

    @property
    def kl_interval(self) -> tuple[float, float]:
        low, high = self.gap_lower, self.gap_upper
        lo = max(0.0, low.value - Z * low.se - self.noise_floor)
        if not self.resolvable:
            return 0.0, max(self.noise_floor, high.value + Z * high.se + self.noise_floor)
        return lo, high.value + Z * high.se + self.noise_floor if self.reliable else math.inf

    @property
    def log_evidence_interval(self) -> tuple[float, float]:
        top = self.iwae[max(self.iwae)]
        hi = self.cubo.value + Z * self.cubo.se + self.noise_floor if self.reliable else math.inf
        return top.value - Z * top.se - self.noise_floor, hi

    def __str__(self) -> str:
        from pyro_elbo._kl_gap_text import report_text

        return report_text(self)

    def plot(self, ax: Any = None) -> Any:
        """Bounds against K with 2-SE error bars, and the bracket of log p(x). Returns the figure."""
        from pyro_elbo._kl_gap_text import report_plot

        return report_plot(self, ax)


def kl_gap(
    model: Model,
    guide: Guide,
    *args: Any,
    num_particles: int = 10_000,
    chunk_size: int = 1000,
    ladder: tuple[int, ...] | None = None,
    max_plate_nesting: int | None = None,
    vectorize_particles: bool | str = "auto",
    per_site: bool = True,
    max_seconds: float = 3600.0,
    bdmc: bool | Mapping[str, Any] = False,
    **kwargs: Any,
) -> KLGapReport:
    """Bracket :math:`\\log p(x)` and :math:`\\mathrm{KL}(q \\,\\|\\, p(z\\mid x))` from both sides.

    Particles are drawn ``chunk_size`` at a time without gradients; only their log-weights are
    kept, so memory is ``O(chunk_size x model)`` for the traces plus ``8 x num_particles x |B|``
    bytes for the log-weights (``|B|`` data points when every site is in the data plate, else 1),
    times one more per latent site with ``per_site``. From the first chunks the run's memory and
    time are estimated; beyond half the machine's memory or ``max_seconds`` it stops at once.

    Standard errors: ELBO from the particle variance; ``IWAE_K`` (K < S) from the spread of its
    ``S // K`` independent group estimates; ``IWAE_S`` and ``CUBO_2`` by the delta method, which is
    unreliable when k̂ > 0.5 (the report warns). Per-data-point bounds are summed over points.
    The noise floor is measured: ``64`` particles are re-evaluated in float64 (parameters, data and
    draws upcast) and twice the range of their rounding errors is the floor. A program that cannot
    run in float64 gets a floor from the magnitudes of its site log-densities instead.

    Args:
        model, guide, *args, **kwargs: as for :func:`~pyro_elbo.log_weights`.
        num_particles: ``S``, total particles.
        chunk_size: particles per vectorized pass.
        ladder: the K of the IWAE ladder (default 1, 10, 100, ... up to S).
        per_site: also compute k̂ per latent site (one dependency analysis of model and guide).
        max_seconds: refuse a run estimated to take longer.
        bdmc: also simulate :math:`(z^*, x^*)` from the model at the current parameters, bracket
            :math:`\\log p(x^*)` by BDMC, and rerun this report on :math:`x^*` (same particles),
            to split its bracket into q's KL and the estimators' looseness (``report.simulated``,
            see :class:`SimulatedGap`). ``True``, or a dict of options for
            :func:`~pyro_elbo.evidence.bdmc`: ``num_chains`` (16), ``num_steps`` (100),
            ``num_leapfrog`` (5), ``transition`` (``"hmc"``/``"mala"``), ``step_size`` (0.5),
            ``simulate_args`` (``{site: x*} -> args``, when the data are not passed as the
            observed tensors themselves). Costs about twice the report plus the AIS runs.

    Returns:
        A :class:`KLGapReport`; ``print(report)`` shows a table and ``report.plot()`` a figure.

    Raises:
        ValueError: observed data with ``inf``/``nan`` (names the site), a subsampled plate, or a
            run that would exceed the memory or ``max_seconds``; with ``bdmc``, an unknown option,
            or a model BDMC cannot anneal (a discrete or enumerated latent site, named).

    References:
        | Importance Weighted Autoencoders (Burda et al., 2016) https://arxiv.org/abs/1509.00519
        | Variational Inference via χ Upper Bound Minimization (Dieng et al., 2017)
        | https://arxiv.org/abs/1611.00328
        | Yes, but Did It Work?: Evaluating Variational Inference (Yao et al., 2018)
        | https://arxiv.org/abs/1802.02538
        | Sandwiching the marginal likelihood using bidirectional Monte Carlo (Grosse et al., 2015)
        | https://arxiv.org/abs/1511.02543
    """
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 2:
        raise ValueError(f"kl_gap needs an integer num_particles >= 2, got {num_particles!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    raise_if_nonfinite_observed(model, guide, args, kwargs, caller="kl_gap")
    bdmc_options = _bdmc_options(bdmc, model, guide, args, kwargs)
    if max_plate_nesting is None:
        max_plate_nesting = guess_max_plate_nesting(model, guide, *args, **kwargs)
    shares = site_shares(model, guide, args, kwargs) if per_site else None
    run = _Run(model, guide, args, kwargs, max_plate_nesting, vectorize_particles, shares)
    log_w, share_w, dtype = run.draw(num_particles, chunk_size, max_seconds)
    ladder = _ladder(num_particles) if ladder is None else tuple(sorted(set(ladder)))
    if any(k < 1 or k > num_particles for k in ladder):
        raise ValueError(f"ladder values must be in [1, {num_particles}], got {ladder}")
    floor, source = run.noise_floor(min(num_particles, ROUNDING_PARTICLES), dtype)
    # a guide that enumerates: TraceEnum_ELBO's ELBO (log_w holds the exact sum, where q(y) cancels)
    elbo = _elbo_estimate(torch.cat(run.elbo_chunks) if run.elbo_chunks else log_w)
    iwae = {1: elbo} | {k: _iwae_estimate(log_w, k) for k in ladder if k > 1}
    spread = log_w.max(0).values - log_w.min(0).values
    constant = bool((spread <= floor).all())
    khat = -math.inf if constant else max((psis_khat(log_w[:, b]) for b in range(log_w.shape[1])), key=_rank)
    report = KLGapReport(
        num_particles=num_particles,
        elbo=elbo,
        iwae=iwae,
        cubo=_power_mean_estimate(log_w, 2.0),
        khat=khat,
        khat_per_site={
            site: max((psis_khat(s[:, b]) for b in range(s.shape[1])), key=_rank) for site, s in share_w.items()
        },
        ess=min(effective_sample_size(log_w[:, b]) for b in range(log_w.shape[1])),
        noise_floor=floor,
        dtype=dtype,
        num_points=log_w.shape[1],
        log_w_sd=float(log_w.sum(1).std()),
        floor_source=source,
        joint_sites=dict(shares.joint) if shares is not None else {},
    )
    from pyro_elbo._kl_gap_text import assess

    report.verdict, report.warnings = assess(report)
    if bdmc_options is not None:
        report.simulated = _simulated_gap(
            model, guide, args, kwargs, bdmc_options, num_particles=num_particles, chunk_size=chunk_size,
            ladder=ladder, vectorize_particles=vectorize_particles, max_plate_nesting=max_plate_nesting,
            max_seconds=max_seconds,
        )  # fmt: skip
    return report


@dataclass(frozen=True)
class SimulatedGap:
    """The KL-gap report on data simulated from the model, where BDMC knows :math:`\\log p(x^*)`.

    Draw :math:`z^* \\sim p(z)`, :math:`x^* \\sim p(x \\mid z^*)`: then :math:`z^*` is an exact
    draw from :math:`p(z \\mid x^*)`, so reverse AIS started at it gives a stochastic upper bound
    ``U`` and forward AIS from q a stochastic lower bound ``L`` of :math:`\\log p(x^*)` (BDMC).
    With the report's own estimates on :math:`x^*`, ``E`` (ELBO), ``I`` (:math:`\\mathrm{IWAE}_K`,
    largest K) and ``C`` (:math:`\\mathrm{CUBO}_2`), and :math:`\\log p = E + \\mathrm{KL}`:

    .. math::

        \\mathrm{KL}(q \\,\\|\\, p(z \\mid x^*)) &\\in [L - E,\\; U - E] && \\text{(q's part)} \\\\
        \\log p(x^*) - I &\\in [L - I,\\; U - I] && \\text{(IWAE's shortfall)} \\\\
        C - \\log p(x^*) &\\in [C - U,\\; C - L] && \\text{(CUBO's excess)}

    The report's bracket :math:`[I - E, C - E]` runs from KL - shortfall to KL + excess: its width
    is all looseness, its upper end KL (q) + excess (CUBO). Intervals are widened by two standard
    errors (BDMC's and the report's, independent) and the noise floor; KL's is clipped at 0. This
    speaks for the real data only insofar as the model fits them, and for a guide fit to the data
    (``guide_sees_data`` false) q on :math:`x^*` is the guide fit to x, not a guide for :math:`x^*`.

    Attributes:
        sandwich: the BDMC run (``lower``, ``upper``, the simulated data).
        report: :func:`kl_gap` on :math:`x^*`, with the same particles.
        guide_sees_data: whether the guide draws differently on :math:`x^*` (amortized) or not.

    References:
        | Sandwiching the marginal likelihood using bidirectional Monte Carlo (Grosse et al., 2015)
        | https://arxiv.org/abs/1511.02543
    """

    sandwich: evidence.Sandwich
    report: KLGapReport
    guide_sees_data: bool

    def _between(self, lo: Estimate, hi: Estimate) -> tuple[float, float]:
        floor = self.report.noise_floor
        return lo.value - Z * lo.se - floor, hi.value + Z * hi.se + floor

    @property
    def kl_interval(self) -> tuple[float, float]:
        """Where KL(q || p(z | x*)) lies: ``[L - E, U - E]`` widened, clipped at 0."""
        lo, hi = self._between(self.sandwich.lower - self.report.elbo, self.sandwich.upper - self.report.elbo)
        return max(0.0, lo), max(0.0, hi)

    @property
    def iwae_shortfall_interval(self) -> tuple[float, float]:
        """Where ``log p(x*) - IWAE_K`` lies (K the largest of the ladder): ``[L - I, U - I]`` widened."""
        top = self.report.iwae[max(self.report.iwae)]
        return self._between(self.sandwich.lower - top, self.sandwich.upper - top)

    @property
    def cubo_excess_interval(self) -> tuple[float, float]:
        """Where ``CUBO_2 - log p(x*)`` lies: ``[C - U, C - L]`` widened (below 0: CUBO biased low)."""
        return self._between(self.report.cubo - self.sandwich.upper, self.report.cubo - self.sandwich.lower)

    @property
    def effective_chains(self) -> float:
        """The fewest chains that carry the AIS weight, forward or reverse, over the data points."""
        return min(float(e.effective_chains.min()) for e in (self.sandwich.forward, self.sandwich.reverse))  # type: ignore[union-attr]

    @property
    def q_share(self) -> tuple[float, float]:
        """The fraction of the bracket's upper end ``C - E`` that is q's KL, from ``kl_interval``
        (clipped to [0, 1]; nan when ``C - E <= 0``)."""
        top = self.report.gap_upper.value
        if top <= 0:
            return math.nan, math.nan
        lo, hi = self.kl_interval
        return min(1.0, lo / top), min(1.0, hi / top)


BDMC_OPTIONS = ("num_chains", "num_steps", "num_leapfrog", "transition", "step_size", "num_spread", "simulate_args")


def _bdmc_options(
    bdmc: bool | Mapping[str, Any], model: Model, guide: Guide, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any] | None:
    """The BDMC options, or None; refuses (before the long run) what BDMC cannot anneal."""
    if bdmc is False:
        return None
    options = {} if bdmc is True else dict(bdmc)
    unknown = sorted(set(options) - set(BDMC_OPTIONS))
    if unknown:
        raise ValueError(f"kl_gap(bdmc=...): unknown option(s) {unknown}; choose from {BDMC_OPTIONS}")
    try:
        evidence.check_bdmc(model, guide, args, kwargs)
    except ValueError as error:
        raise ValueError(f"kl_gap(bdmc=...) cannot run BDMC: {error}") from error
    return options


def _simulated_gap(model: Model, guide: Guide, args: tuple[Any, ...], kwargs: dict[str, Any],
                   options: dict[str, Any], **again: Any) -> SimulatedGap:  # fmt: skip
    """Simulate x*, sandwich log p(x*) by BDMC, and rerun the report on x*."""
    options = dict(options)
    sim = evidence.simulate_data(model, guide, args, kwargs, options.pop("simulate_args", None))
    sandwich = evidence.sandwich(sim, guide, **options)
    report = kl_gap(sim.model, guide, *sim.args, per_site=False, **again, **sim.kwargs)
    return SimulatedGap(sandwich, report, sim.guide_sees_data)


def _rank(x: float) -> float:
    """Sort key for the worst k̂: nan (unknown) above everything, -inf below."""
    return math.inf if math.isnan(x) else x


class _Run:
    """One model/guide pair under evaluation: draws chunks and measures rounding."""

    def __init__(
        self,
        model: Model,
        guide: Guide,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        max_plate_nesting: int,
        vectorize: bool | str,
        shares: SiteShares | None,
    ) -> None:
        self.model, self.guide, self.args, self.kwargs = model, guide, args, kwargs
        self.max_plate_nesting, self.vectorize, self.shares = max_plate_nesting, vectorize, shares
        self.abs_terms = 0.0
        self.drawn = 0
        self.elbo_chunks: list[Tensor] = []  # LogWeights.elbo_terms, where the guide enumerates

    def chunk(self, size: int) -> tuple[Tensor, dict[str, Tensor], torch.dtype]:
        lw = log_weights(
            self.model,
            self.guide,
            *self.args,
            num_particles=size,
            max_plate_nesting=self.max_plate_nesting,
            vectorize_particles=self.vectorize,
            need={"per_site"} if self.shares else set(),
            **self.kwargs,
        )
        if lw.batch_scale != 1.0 or lw.subsampled_plates:
            plates = list(lw.subsampled_plates) or list(lw.batch_plates)
            raise ValueError(
                f"kl_gap needs the full data set, but plate(s) {plates} are subsampled: each chunk of "
                "particles would see different data points. Pass subsample_size=None / all the data."
            )
        shares: dict[str, Tensor] = {}
        if self.shares is not None:
            # an enumerated group's marginal stands for every site it absorbed, counted once
            group = {
                name: key
                for key in lw.site_log_p
                if key.startswith(MARGINAL_PREFIX)
                for name in key[len(MARGINAL_PREFIX) :].split("+")
            }
            for z, model_sites in self.shares.model_sites.items():
                if z in self.shares.joint or z in group and z not in lw.site_log_q:
                    continue  # a joint guide density, or a site summed out (it has no guide density)
                keys = dict.fromkeys(group.get(s, s) for s in model_sites)
                share = sum((lw.site_log_p[k] for k in keys), torch.zeros_like(lw.log_p))
                share = share - sum((lw.site_log_q[s] for s in self.shares.guide_sites[z]), torch.zeros_like(lw.log_p))
                shares[z] = share.double().reshape(size, -1).cpu()
        self.abs_terms += float(
            sum(v.abs().sum() for v in (*lw.site_log_p.values(), *lw.site_log_q.values()))
            if lw.site_log_p
            else lw.log_p.abs().sum() + lw.log_q.abs().sum()
        )
        if lw.elbo_terms is not None:
            self.elbo_chunks.append(lw.elbo_terms.double().reshape(size, -1).cpu())
        return lw.log_w.double().reshape(size, -1).cpu(), shares, lw.log_p.dtype

    def draw(self, num: int, chunk_size: int, max_seconds: float) -> tuple[Tensor, dict[str, Tensor], torch.dtype]:
        chunks: list[Tensor] = []
        share_chunks: dict[str, list[Tensor]] = {}
        dtype = torch.get_default_dtype()
        with torch.no_grad():
            while self.drawn < num:
                size = min(chunk_size, num - self.drawn)
                start = time.perf_counter()
                log_w, shares, dtype = self.chunk(size)
                chunks.append(log_w)
                for site, share in shares.items():
                    share_chunks.setdefault(site, []).append(share)
                self.drawn += size
                if len(chunks) <= 2:  # the second chunk is timed without one-time costs
                    _check_budget(
                        num, chunk_size, log_w.shape[1] * (1 + len(shares)), time.perf_counter() - start, max_seconds
                    )
        return torch.cat(chunks), {site: torch.cat(c) for site, c in share_chunks.items()}, dtype

    def noise_floor(self, num: int, dtype: torch.dtype) -> tuple[float, str]:
        """Bound on the rounding error of a gap: measured against float64 when possible."""
        eps = torch.finfo(dtype).eps
        estimated = 4 * eps * self.abs_terms / max(self.drawn, 1) + 1e-300
        if dtype == torch.float64:
            return estimated, "magnitudes"
        with torch.no_grad():
            error = float64_rounding_error(self.model, self.guide, self.args, self.kwargs, num, self.max_plate_nesting)
        if error is None or not torch.isfinite(error).all():
            return 100 * estimated, "magnitudes (float64 re-evaluation failed)"
        error = error.reshape(error.shape[0], -1)  # fewer rows when particles ran one per run
        measured = ROUNDING_SAFETY * float((error.max(0).values - error.min(0).values).sum())
        return max(measured, estimated), "measured against float64"


def _check_budget(num: int, chunk_size: int, values_per_particle: int, seconds: float, max_seconds: float) -> None:
    need = 8 * num * values_per_particle
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 2**40
    eta = seconds * math.ceil(num / chunk_size)
    if need > memory / 2 or eta > max_seconds:
        raise ValueError(
            f"kl_gap(num_particles={num}) would keep {need / 2**30:.3g} GiB of log-weights (this machine "
            f"has {memory / 2**30:.3g} GiB) and take about {eta / 3600:.3g} h ({seconds:.3g} s per chunk of "
            f"{chunk_size}); lower num_particles (10_000 to 1_000_000 is plenty), pass per_site=False to "
            f"keep one value per particle, or raise max_seconds (now {max_seconds:g})."
        )


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


__all__ = ["Estimate", "KLGapReport", "SimulatedGap", "kl_gap"]
