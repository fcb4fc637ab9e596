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
from pyro_elbo._pyro.guide_plates import plates_of_model
from pyro_elbo._pyro.inspect import (
    SiteShares,
    as_float64,
    float64_program,
    outside_randomness,
    precision_losses,
    raise_if_nonfinite_observed,
    rounding_check,
    site_shares,
    sizeless_plate_problems,
    support_edges,
)
from pyro_elbo._pyro.log_weights import guess_max_plate_nesting, log_weights
from pyro_elbo._pyro.supports import support_differences
from pyro_elbo._typing import Guide, Model
from pyro_elbo.psis import effective_sample_size, psis_khat

#: below this many effective particles, importance sampling is unreliable whatever k̂ says
MIN_ESS = 20.0
#: half the variance of log w (the KL to second order) at most this: q matches the posterior's bulk
SMALL_KL = 0.05
#: the upper end of the KL interval at most this (nats) for the verdict "good"
GOOD_KL = 0.1
#: an "exact" verdict needs at least this share of the particles effective: the weights are
#: nearly equal, so KL <= log(1 + chi^2) ~ log(S / ESS) <= log 2, whatever the noise floor says
EXACT_ESS_SHARE = 0.5
#: particles re-evaluated in float64 to measure the rounding error of the log-weights
ROUNDING_PARTICLES = 64
#: the measured rounding-error range over ROUNDING_PARTICLES, times this, is the noise floor
#: (the range of S >> 64 Gaussian errors is at most ~1.7x that of 64; 2x leaves room for tails)
ROUNDING_SAFETY = 2.0
#: error bars of the printed intervals, in standard errors
Z = 2.0


@dataclass(frozen=True)
class PerPoint:
    """Per-data-point diagnostics of a model whose data plate encloses every latent.

    Attributes:
        khat, ess: ``[N]`` PSIS k̂ and importance ESS of each point's own log-weights.
        kl_lower, kl_upper: ``[N]`` each point's bracket ``IWAE_S - ELBO`` and ``CUBO_2 - ELBO``
            (estimates; the upper end is meaningful only where k̂ < 0.7 and ESS >= ``MIN_ESS``).
    """

    khat: Tensor
    ess: Tensor
    kl_lower: Tensor
    kl_upper: Tensor

    @property
    def num_points(self) -> int:
        return int(self.khat.numel())

    @property
    def unreliable(self) -> Tensor:
        """``[N]`` whether a point's importance sampling is unreliable (k̂ >= 0.7, ESS < 20, nan)."""
        return ~((self.khat < 0.7) & (self.ess >= MIN_ESS))

    def quantile(self, values: Tensor, q: float) -> float:
        finite = values[~torch.isnan(values)]
        return float(torch.quantile(finite.clamp(-1e300, 1e300), q)) if finite.numel() else math.nan

    def worst(self, count: int = 3) -> list[int]:
        """Indices of the ``count`` points with the largest k̂ (nan first), then the lowest ESS."""
        key = torch.where(torch.isnan(self.khat), torch.full_like(self.khat, math.inf), self.khat)
        order = sorted(range(self.num_points), key=lambda i: (-float(key[i]), float(self.ess[i])))
        return order[:count]


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
        per_point: for a data plate enclosing every latent (``num_points > 1``), each point's k̂,
            ESS and bracket (:class:`PerPoint`); the verdict reads their distribution, and the
            headline k̂ and ESS are the worst point's.
        khat_per_site: latent site -> k̂ of that site's share of the log-weight (its own factor
            and its children's, minus its guide density including its auxiliary guide sites).
        joint_sites: latent sites left out of ``khat_per_site``: their guide density is joint
            (e.g. ``AutoMultivariateNormal``), latent -> the shared auxiliary sites.
        ess: importance effective sample size (of ``num_particles``; the worst data point).
        log_w_sd: standard deviation of ``log w`` (summed over data points; particles outside
            the model's support left out); ``log_w_sd**2 / 2`` is the KL to second order.
        noise_floor: bound on the rounding error of the gaps, in nats (see ``floor_source``).
        resolvable: whether the upper end of the bracket exceeds the noise floor.
        reliable: k̂ < 0.7 and ESS >= ``MIN_ESS``: IWAE and CUBO and their errors can be trusted.
        verdict: one line; warnings: why parts of the report should not be trusted.
        replay_error: the largest change of a log-weight between two evaluations at the same
            draws in the working dtype: nonzero when the program is random beyond its sample sites
            (``random_modules`` names the modules in training mode found, e.g. ``"Dropout at
            encoder.drop"``); the noise floor then comes from magnitudes, and no verdict claims
            more than the lower end of the bracket.
        precision_losses: sites whose log-density in the working dtype (float32) underflows,
            overflows or is off by more than 0.1 nats and 1e-3 of its size against float64 at the
            same draws, each named with its numbers; such a report is evaluated again in float64
            when the program runs in float64 (``dtype`` says which), else no verdict claims more
            than the lower end of the bracket.
        support_edges: guide sites some of whose draws sit where this dtype ends their support
            (torch clamps them there): the bounds are biased, and no verdict claims more than
            the lower end of the bracket.
        notes: what was evaluated where it is not the obvious (e.g. an autoguide built on
            subsamples, evaluated with its per-point parameters on all the data given).
        wider_supports: latent sites whose guide support is wider than the model's, each naming
            both supports: q puts mass where :math:`p(x, z) = 0`, so the KL is :math:`+\\infty` by
            definition (``kl_interval`` is ``(inf, inf)``) and the verdict says so, whatever the
            draws show; IWAE and CUBO still bracket :math:`\\log p(x)` (weights outside are zero).
        narrower_supports: latent sites whose guide support is narrower than the model's, each
            naming both supports: q's draws cannot see posterior mass outside q's support, so CUBO
            is no upper bound there; ``kl_interval`` and ``log_evidence_interval`` keep only their
            lower ends and the verdict claims nothing more.
        outside_draws: with ``wider_supports``, the number of draws (particles times data
            points) that fell outside the model's support (log-weight :math:`-\\infty`).
        restricted_kl: with ``wider_supports``, what the draws measured: the bracket
            ``IWAE_S - ELBO``, ``CUBO_2 - ELBO`` for :math:`q` restricted to the model's support and
            renormalized (:math:`q_r = q \\, 1_{p > 0} / P`, whose importance weights are
            :math:`P w`), estimated from the draws inside with :math:`\\hat P` the share of them
            (estimates without error bars; ``None`` if some data point has no draw inside).
        contradictions: where the verdict :func:`assess` reached disagrees with the report's own
            ESS, k̂ or ladder ``ELBO <= IWAE_K <= CUBO``; then the verdict starts with
            "inconsistent" and claims nothing, and ``kl_interval`` has no upper end.
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
    contradictions: list[str] = field(default_factory=list)
    replay_error: float = 0.0
    random_modules: list[str] = field(default_factory=list)
    precision_losses: list[str] = field(default_factory=list)
    per_point: PerPoint | None = None
    support_edges: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    wider_supports: list[str] = field(default_factory=list)
    narrower_supports: list[str] = field(default_factory=list)
    outside_draws: int = 0
    restricted_kl: tuple[float, float] | None = None

    @property
    def consistent(self) -> bool:
        """Whether the verdict agrees with the report's own ESS, k̂ and ladder of bounds."""
        return not self.contradictions

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
        if self.wider_supports:  # q puts mass where the posterior has none
            return math.inf, math.inf
        low, high = self.gap_lower, self.gap_upper
        lo = max(0.0, low.value - Z * low.se - self.noise_floor)
        if not self.consistent or self.narrower_supports:  # (q's draws cannot see mass outside q's support)
            return lo, math.inf
        if not self.resolvable:
            return 0.0, max(self.noise_floor, high.value + Z * high.se + self.noise_floor)
        return lo, high.value + Z * high.se + self.noise_floor if self.reliable else math.inf

    @property
    def log_evidence_interval(self) -> tuple[float, float]:
        top = self.iwae[max(self.iwae)]
        trusted = self.reliable and self.consistent and not self.narrower_supports
        hi = self.cubo.value + Z * self.cubo.se + self.noise_floor if trusted else math.inf
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
    The noise floor is measured: ``64`` particles are evaluated twice at the same draws in the
    working dtype (a difference means randomness outside the sample sites, e.g. a module in
    training mode, named in the report; the floor then comes from magnitudes), then re-evaluated
    in float64 (parameters, data and draws upcast) and twice the range of their rounding errors is
    the floor. A site whose float32 log-density underflows, overflows or loses more than 0.1 nats
    against float64, or whose draws sit where float32 ends its support, is named, and the whole
    report is evaluated again in float64. A program that cannot run in float64 gets a floor from
    the magnitudes of its site log-densities instead. The floor never decides a verdict alone:
    every report is checked against its own ESS, k̂ and ladder before it is returned.

    For a data plate enclosing every latent (sized, or size-less with its size read off its
    sites), ``report.per_point`` holds each point's k̂, ESS and bracket; the verdict reads their
    distribution and the headline k̂ and ESS are the worst point's.

    A guide whose support is wider than the model's (``report.wider_supports``) puts mass where
    the posterior has none: its KL is :math:`+\\infty` by definition, the verdict says so and
    names the site, whatever the draws show, and the warning says what they measured (how many
    fell outside, the bracket of q restricted to the model's support). A guide whose support is
    narrower (``report.narrower_supports``) cannot see posterior mass outside it: the report keeps
    the lower ends (IWAE, IWAE - ELBO) and claims no upper end. An autoguide built on
    subsamples (Pyro's ``AutoNormal`` trained on minibatches) is evaluated on the data given, with
    its per-point parameters of every point (``report.notes`` says so; see
    :mod:`~pyro_elbo._pyro.guide_plates`).

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
    with plates_of_model(model, guide, args, kwargs) as notes:  # an autoguide built on subsamples: these data
        report = _kl_gap(model, guide, args, kwargs, num_particles=num_particles, chunk_size=chunk_size,
                         ladder=ladder, max_plate_nesting=max_plate_nesting, vectorize_particles=vectorize_particles,
                         per_site=per_site, max_seconds=max_seconds, bdmc=bdmc)  # fmt: skip
    report.notes = notes + report.notes
    return report


def _kl_gap(
    model: Model,
    guide: Guide,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    num_particles: int,
    chunk_size: int,
    ladder: tuple[int, ...] | None,
    max_plate_nesting: int | None,
    vectorize_particles: bool | str,
    per_site: bool,
    max_seconds: float,
    bdmc: bool | Mapping[str, Any],
) -> KLGapReport:
    raise_if_nonfinite_observed(model, guide, args, kwargs, caller="kl_gap")
    bdmc_options = _bdmc_options(bdmc, model, guide, args, kwargs)
    if max_plate_nesting is None:
        max_plate_nesting = guess_max_plate_nesting(model, guide, *args, **kwargs)
    ladder = _ladder(num_particles) if ladder is None else tuple(sorted(set(ladder)))
    if any(k < 1 or k > num_particles for k in ladder):
        raise ValueError(f"ladder values must be in [1, {num_particles}], got {ladder}")
    options: dict[str, Any] = dict(
        num_particles=num_particles, chunk_size=chunk_size, ladder=ladder, max_plate_nesting=max_plate_nesting,
        vectorize_particles=vectorize_particles, per_site=per_site, max_seconds=max_seconds,
    )  # fmt: skip
    report = _report(model, guide, args, kwargs, **options)
    report.warnings.extend(sizeless_plate_problems(model, guide, args, kwargs))
    if report.precision_losses and report.dtype != torch.float64:
        report = _in_float64(report, model, guide, args, kwargs, options)
    if bdmc_options is not None:
        report.simulated = _simulated_gap(
            model, guide, args, kwargs, bdmc_options, num_particles=num_particles, chunk_size=chunk_size,
            ladder=ladder, vectorize_particles=vectorize_particles, max_plate_nesting=max_plate_nesting,
            max_seconds=max_seconds,
        )  # fmt: skip
    return report


def _report(
    model: Model,
    guide: Guide,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    num_particles: int,
    chunk_size: int,
    ladder: tuple[int, ...],
    max_plate_nesting: int,
    vectorize_particles: bool | str,
    per_site: bool,
    max_seconds: float,
) -> KLGapReport:
    """One report in the program's working dtype, checked against its own numbers."""
    shares = site_shares(model, guide, args, kwargs) if per_site else None
    run = _Run(model, guide, args, kwargs, max_plate_nesting, vectorize_particles, shares)
    log_w, share_w, dtype = run.draw(num_particles, chunk_size, max_seconds)
    floor, source = run.noise_floor(min(num_particles, ROUNDING_PARTICLES), dtype)
    # a guide that enumerates: TraceEnum_ELBO's ELBO (log_w holds the exact sum, where q(y) cancels)
    elbo_terms = torch.cat(run.elbo_chunks) if run.elbo_chunks else log_w
    elbo = _elbo_estimate(elbo_terms)
    iwae = {1: elbo} | {k: _iwae_estimate(log_w, k) for k in ladder if k > 1}
    spread = log_w.max(0).values - log_w.min(0).values
    ess_points = [effective_sample_size(log_w[:, b]) for b in range(log_w.shape[1])]
    ess = min(ess_points)
    # constant to rounding only if the weights agree: the floor alone never decides it
    constant = bool((spread <= floor).all()) and ess >= EXACT_ESS_SHARE * num_particles
    khat_points = [-math.inf if constant else psis_khat(log_w[:, b]) for b in range(log_w.shape[1])]
    khat = max(khat_points, key=_rank)
    cubo = _power_mean_estimate(log_w, 2.0)
    per_point = None
    if log_w.shape[1] > 1:
        elbo_i = elbo_terms.mean(0)
        per_point = PerPoint(
            khat=torch.tensor(khat_points, dtype=torch.float64),
            ess=torch.tensor(ess_points, dtype=torch.float64),
            kl_lower=torch.logsumexp(log_w, 0) - math.log(num_particles) - elbo_i,
            kl_upper=(torch.logsumexp(2 * log_w, 0) - math.log(num_particles)) / 2 - elbo_i,
        )
    report = KLGapReport(
        num_particles=num_particles,
        elbo=elbo,
        iwae=iwae,
        cubo=cubo,
        khat=khat,
        khat_per_site={
            site: max((psis_khat(s[:, b]) for b in range(s.shape[1])), key=_rank) for site, s in share_w.items()
        },
        ess=ess,
        noise_floor=floor,
        dtype=dtype,
        num_points=log_w.shape[1],
        log_w_sd=float(_finite_rows(log_w.sum(1)).std()),
        floor_source=source,
        joint_sites=dict(shares.joint) if shares is not None else {},
        replay_error=run.replay_error,
        random_modules=run.randomness,
        precision_losses=run.precision,
        support_edges=run.edges,
        per_point=per_point,
    )
    report.wider_supports, report.narrower_supports = support_differences(model, guide, args, kwargs)
    if report.wider_supports:
        report.outside_draws = int((log_w == -math.inf).sum())
        report.restricted_kl = _restricted_kl(log_w)
    from pyro_elbo._kl_gap_text import assess, check_consistency

    report.verdict, report.warnings = assess(report)
    check_consistency(report)
    return report


def _in_float64(
    report: KLGapReport,
    model: Model,
    guide: Guide,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    options: dict[str, Any],
) -> KLGapReport:
    """The report again in float64 (parameters, modules, data upcast), for a program whose
    working-dtype log-densities were found wrong at some sites; the working-dtype report (whose
    verdict then claims nothing) if the program cannot run in float64."""
    from pyro_elbo._kl_gap_text import precision_text

    try:
        with float64_program((model, guide)):
            again = _report(model, guide, as_float64(args), as_float64(kwargs), **options)
    except Exception as error:  # noqa: BLE001 - the working-dtype report stands, its verdict withdrawn
        report.warnings.append(f"the float64 re-evaluation failed ({type(error).__name__}: {error})")
        return report
    if again.dtype != torch.float64:
        return report
    again.precision_losses = report.precision_losses
    again.warnings.insert(0, precision_text(report, rerun=True))
    return again


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
        #: largest change of a log-weight between two evaluations at the same draws (0: none)
        self.replay_error = 0.0
        #: the modules in training mode found to make the program random (by name)
        self.randomness: list[str] = []
        #: sites whose working-dtype log-density is wrong against float64 (by name, with numbers)
        self.precision: list[str] = []
        #: guide sites with draws at the edge of the support the dtype represents (by name)
        self.edges: list[str] = []
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
        self.abs_terms += float(  # a draw outside the model's support (-inf) has no rounding error
            sum(_finite(v).abs().sum() for v in (*lw.site_log_p.values(), *lw.site_log_q.values()))
            if lw.site_log_p
            else _finite(lw.log_p).abs().sum() + _finite(lw.log_q).abs().sum()
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
        """Bound on the rounding error of a gap: measured against float64 when possible, and only
        when the program reproduces its own log-weights at the same draws (``self.randomness``)."""
        eps = torch.finfo(dtype).eps
        estimated = 4 * eps * self.abs_terms / max(self.drawn, 1) + 1e-300
        with torch.no_grad():
            again = rounding_check(
                self.model, self.guide, self.args, self.kwargs, num, self.max_plate_nesting, upcast=False
            )
        if again is not None:
            self.edges = support_edges(again, dtype)
            if dtype != torch.float64:
                self.precision.extend(self.edges)
        error_again = None if again is None else again.error
        if error_again is not None and torch.isfinite(error_again).all() and float(error_again.abs().max()) > estimated:
            self.replay_error = float(error_again.abs().max())
            self.randomness = outside_randomness(self.model, self.guide, self.args, self.kwargs)
            return estimated, "magnitudes (the program is random beyond its sample sites)"
        if dtype == torch.float64:
            return estimated, "magnitudes"
        with torch.no_grad():
            check = rounding_check(self.model, self.guide, self.args, self.kwargs, num, self.max_plate_nesting)
        if check is not None:
            self.precision = precision_losses(check) + self.precision
        error = None if check is None else check.error
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


def _finite(x: Tensor) -> Tensor:
    """``x`` with its ``-inf`` entries (log-densities of values outside a support) as zeros."""
    return torch.where(x == -math.inf, torch.zeros_like(x), x)


def _finite_rows(totals: Tensor) -> Tensor:
    """The particles' summed log-weights without those outside the model's support (``-inf``)."""
    return totals[totals != -math.inf]


def _restricted_kl(log_w: Tensor) -> tuple[float, float] | None:
    """The KL bracket of q restricted to the model's support, from ``[S, B]`` log-weights some of
    which are ``-inf`` (draws outside it); see :attr:`KLGapReport.restricted_kl`.

    With :math:`\\hat P` the share of draws inside and :math:`\\bar\\ell` the mean of their log-weights,
    the restricted guide's weights are :math:`\\hat P w`, so its ELBO is :math:`\\bar\\ell + \\log \\hat P`,
    its IWAE equals q's and its CUBO is q's plus :math:`\\tfrac12 \\log \\hat P`; summed over points.
    """
    num = log_w.shape[0]
    inside = torch.isfinite(log_w)
    count = inside.sum(0)
    if bool((count == 0).any()):
        return None
    log_share = torch.log(count / num)
    mean_inside = torch.where(inside, log_w, torch.zeros_like(log_w)).sum(0) / count
    iwae = torch.logsumexp(log_w, 0) - math.log(num)
    cubo = (torch.logsumexp(2 * log_w, 0) - math.log(num)) / 2
    lower = float((iwae - mean_inside - log_share).sum())
    upper = float((cubo - mean_inside - log_share / 2).sum())
    return lower, upper


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


__all__ = ["Estimate", "KLGapReport", "PerPoint", "SimulatedGap", "kl_gap"]
