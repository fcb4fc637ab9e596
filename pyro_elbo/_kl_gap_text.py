"""The printed table and the figure of a :class:`~pyro_elbo.kl_gap.KLGapReport`."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from pyro_elbo.kl_gap import EXACT_ESS_SHARE, GOOD_KL, MIN_ESS, SMALL_KL
from pyro_elbo.kl_gap import Z as Z_TEXT

if TYPE_CHECKING:
    from pyro_elbo.kl_gap import KLGapReport, SimulatedGap

#: below this fraction of the chains effective, BDMC's standard errors are not trusted
FEW_CHAINS = 0.25
#: Markov: P(log Z_hat > log Z + t) <= exp(-t) for an unbiased Z_hat; t = log(1 / 0.023)
MARKOV_T = math.log(1 / 0.023)

MEANING = (
    "(each end: its bound -/+ 2 standard errors and the noise floor; unless a warning below says "
    "otherwise, the truth lies inside in about 95% of runs)"
)


def _interval(lo: float, hi: float) -> str:
    return f"in [{lo:.4f}, {hi:.4f}]" if math.isfinite(hi) else f">= {lo:.4f}   (no upper end: see the warning)"


def _site_verdict(k: float) -> str:
    if math.isnan(k):
        return ""
    if k == -math.inf:
        return "(constant share)"
    if k < 0.5:
        return "good"
    if k < 0.7:
        return "ok"
    return "heavy-tailed share"


def _site_rank(item: tuple[str, float]) -> float:
    return -item[1] if math.isfinite(item[1]) else 1e9


def report_text(report: KLGapReport) -> str:
    dtype = str(report.dtype).replace("torch.", "")
    points = f", {report.num_points} data points" if report.num_points > 1 else ""
    lines = [f"KL-gap report ({report.num_particles} particles, {dtype}{points})", ""]
    lines.append(f"  {'bound':<12}{'estimate':>14}{'std. error':>13}")
    lines.append(f"  {'ELBO':<12}{report.elbo.value:>14.4f}{report.elbo.se:>13.4f}")
    for k, est in report.iwae.items():
        if k > 1:
            lines.append(f"  {'IWAE_' + str(k):<12}{est.value:>14.4f}{est.se:>13.4f}")
    lines.append(f"  {'CUBO_2':<12}{report.cubo.value:>14.4f}{report.cubo.se:>13.4f}")
    lines.append("")
    lines.append(f"  log p(x)    {_interval(*report.log_evidence_interval)}")
    if report.wider_supports:
        lines.append("  KL(q || p)  = inf by definition: q draws where the model's density is zero (see the verdict)")
    elif report.resolvable or not report.consistent or report.narrower_supports:
        lines.append(f"  KL(q || p)  {_interval(*report.kl_interval)}")
    else:
        lines.append(f"  KL(q || p)  not resolvable: below the {report.noise_floor:.2g} nat rounding noise floor")
    lines.append(f"              {MEANING}")
    lines.append(f"  noise floor {report.noise_floor:.3g} nats ({report.floor_source})")
    worst = " (worst data point)" if report.per_point is not None else ""
    lines.append(f"  PSIS k-hat  {report.khat:.3f}{worst}")
    lines.append(f"  ESS         {report.ess:.1f} of {report.num_particles}{worst}")
    lines.append(f"  verdict     {report.verdict}")
    lines.extend(per_point_text(report))
    if report.khat_per_site:
        lines.append("  k-hat per site (its share of log w):")
        ranked = sorted(report.khat_per_site.items(), key=_site_rank)
        for site, site_khat in ranked:
            lines.append(f"    {site:<20}{site_khat:>8.3f}   {_site_verdict(site_khat)}")
    if report.joint_sites:
        shared = sorted({aux for auxs in report.joint_sites.values() for aux in auxs})
        lines.append(
            f"    {', '.join(sorted(report.joint_sites))}: joint guide density ({', '.join(shared)}), no per-site share"
        )
    for message in report.warnings:
        lines.append(f"  warning: {message}")
    for note in report.notes:
        lines.append(f"  note: {note}")
    if report.simulated is not None:
        lines.extend(simulated_text(report.simulated))
    return "\n".join(lines)


def _pair(lo: float, hi: float) -> str:
    return f"[{lo:.4f}, {hi:.4f}]"


def simulated_text(sim: SimulatedGap) -> list[str]:
    """The BDMC section: the bracket on simulated data, split into q's KL and looseness."""
    s, r = sim.sandwich, sim.report
    fwd = s.forward
    steps = 0 if fwd.step_size is None else fwd.step_size.shape[0]
    accept = "" if fwd.acceptance_rate is None else f", acceptance {float(fwd.acceptance_rate.mean()):.2f}"
    gap_lo, gap_hi = r.gap_lower.value, r.gap_upper.value
    share_lo, share_hi = sim.q_share
    share = "" if math.isnan(share_lo) else f": q is {100 * share_lo:.0f}% to {100 * share_hi:.0f}% of it"
    lines = [
        "",
        "On data simulated from the model (z* ~ p(z), x* ~ p(x | z*) at the current parameters), where",
        "BDMC sandwiches the true log p(x*) (Grosse et al. 2015):",
        f"  BDMC        {fwd.num_particles} chains x {steps} steps each way{accept}; width {s.width:.4f} nats"
        + (" (below 0: the bounds agree within their noise)" if s.width < 0 else ""),
        f"  log p(x*)   in [{s.lower}, {s.upper}]",
        f"  ELBO(x*)    {r.elbo}",
        f"  KL(q || p(z | x*))   in {_pair(*sim.kl_interval)}   (q's part: how far q is from this posterior)",
        f"  kl_gap's bracket on x*: KL in [{gap_lo:.4f}, {gap_hi:.4f}] (IWAE_{max(r.iwae)} - ELBO, CUBO_2 - ELBO), "
        f"width {gap_hi - gap_lo:.4f}",
        f"    IWAE_{max(r.iwae)} shortfall (log p - IWAE) in {_pair(*sim.iwae_shortfall_interval)}   "
        "(estimator looseness)",
        f"    CUBO_2 excess (CUBO - log p)   in {_pair(*sim.cubo_excess_interval)}   (estimator looseness)",
        f"    the width is shortfall + excess; the upper end {gap_hi:.4f} is KL + excess{share}",
    ]
    if sim.cubo_excess_interval[1] < 0:
        lines.append("    CUBO_2 is below log p(x*) here: its estimate is biased low (heavy-tailed weights)")
    if sim.effective_chains < FEW_CHAINS * fwd.num_particles:
        kl_lo, kl_hi = sim.kl_interval
        lines.append(
            f"    few chains carry BDMC's weight ({sim.effective_chains:.1f} of {fwd.num_particles} effective): its "
            "standard errors may understate its error (raise num_steps or num_chains). Without them, Markov's "
            f"inequality puts KL in [{max(0.0, kl_lo - MARKOV_T):.4f}, {kl_hi + MARKOV_T:.4f}] (AIS makes each end "
            "fail with probability <= 2.3%, however heavy its weights)"
        )
    if s.width > max(gap_hi - gap_lo, 0.0):
        lines.append("    the sandwich is wider than the bracket: BDMC cannot split it (more chains or steps)")
    lines.append(f"  simulated verdict  {r.verdict}")
    lines.append("  caution: this is a statement about data the model generates; it speaks for the real data only")
    lines.append("  insofar as the model fits them (check that first, e.g. with posterior predictive checks).")
    if not sim.guide_sees_data:
        lines.append(
            "  The guide draws the same on x* as on the real data: on x* it is the q fit to the real data, not a"
        )
        lines.append("  guide for x*, so its KL on x* is not its KL on x; what carries over is how loose IWAE and")
        lines.append("  CUBO are for a q this far from the posterior.")
    return lines


def report_plot(report: KLGapReport, ax: Any = None) -> Any:
    import matplotlib

    if ax is None:
        matplotlib.use(matplotlib.get_backend())
        import matplotlib.pyplot as plt

        if report.per_point is not None:
            fig, (ax, point_ax) = plt.subplots(1, 2, figsize=(11, 4))
        else:
            fig, ax = plt.subplots(figsize=(6, 4))
            point_ax = None
    else:
        fig = ax.figure
        point_ax = ax.inset_axes((0.08, 0.55, 0.35, 0.35)) if report.per_point is not None else None
    ks = sorted(report.iwae)
    values = [report.iwae[k].value for k in ks]
    errors = [2 * report.iwae[k].se for k in ks]
    ax.errorbar(ks, values, yerr=errors, marker="o", capsize=3, label="IWAE$_K$ (lower bounds)")
    ax.axhline(report.elbo.value, color="C2", ls="--", label=f"ELBO = {report.elbo.value:.3f}")
    lo, hi = report.log_evidence_interval
    if math.isfinite(hi):
        ax.axhline(report.cubo.value, color="C3", ls="--", label=f"CUBO$_2$ = {report.cubo.value:.3f}")
        ax.axhspan(lo, hi, color="C1", alpha=0.15, label="log p(x) interval (±2 se, floor)")
    else:
        ax.axhline(lo, color="C1", ls=":", label="log p(x) >= (CUBO unreliable)")
    ax.set_xscale("log")
    ax.set_xlabel("K (particles per bound)")
    ax.set_ylabel("nats")
    kl_lo, kl_hi = report.kl_interval
    title = (
        "KL(q‖p) = ∞ (q's support is wider than the model's)"
        if report.wider_supports
        else (f"KL(q‖p) ∈ [{kl_lo:.3g}, {kl_hi:.3g}]")
    )
    ax.set_title(f"{title},  k̂ = {report.khat:.2f}", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    if point_ax is not None and report.per_point is not None:
        khat = report.per_point.khat.clamp(-1.0, 2.0)
        point_ax.scatter(range(len(khat)), khat.tolist(), s=6, color="C0")
        for level, color in ((0.5, "C1"), (0.7, "C3")):
            point_ax.axhline(level, color=color, ls="--", lw=1)
        point_ax.set_xlabel("data point", fontsize=8)
        point_ax.set_ylabel("k-hat (clipped to [-1, 2])", fontsize=8)
        point_ax.set_title("per-point PSIS k-hat", fontsize=9)
    fig.tight_layout()
    return fig


def _per_point_verdict(report: KLGapReport, untrusted: str) -> tuple[str, list[str]] | None:
    """The verdict of a per-point report where only some points are unreliable: it names how
    many and which, and brackets the KL over the others (None: all or none are unreliable)."""
    points = report.per_point
    if points is None:
        return None
    bad = points.unreliable
    m, n = int(bad.sum()), points.num_points
    if m == 0 or m == n:
        return None
    i = points.worst(1)[0]
    good = ~bad
    lo, hi = float(points.kl_lower[good].sum()), float(points.kl_upper[good].sum())
    verdict = (
        f"BAD for {m} of {n} data points (k-hat >= 0.7 or ESS < {MIN_ESS:g}; the worst, #{i}: k-hat "
        f"{float(points.khat[i]):.2f}, ESS {float(points.ess[i]):.1f}); the other {n - m} are reliable"
    )
    return verdict, [
        f"{m} of {n} data points have unreliable importance weights: for the total, {untrusted}. Over the "
        f"other {n - m} points, IWAE_{report.num_particles} - ELBO = {lo:.4g} and CUBO_2 - ELBO = {hi:.4g} nats "
        "(estimates, summed): rerun the worst points alone with more particles to bracket them"
    ]


def per_point_text(report: KLGapReport) -> list[str]:
    """The distribution of the per-point k-hat, ESS and bracket, and the worst points."""
    points = report.per_point
    if points is None:
        return []
    n, bad = points.num_points, points.unreliable
    share = float((points.khat > 0.7).double().mean())
    worst = ", ".join(
        f"#{i} (k-hat {float(points.khat[i]):.2f}, ESS {float(points.ess[i]):.1f})" for i in points.worst(3)
    )
    return [
        f"  per data point ({n}; the k-hat and ESS above are the worst point's):",
        f"    k-hat       median {points.quantile(points.khat, 0.5):.3f}, 90th pct "
        f"{points.quantile(points.khat, 0.9):.3f}; > 0.7 at {100 * share:.1f}% of points",
        f"    ESS         median {points.quantile(points.ess, 0.5):.1f}, 10th pct {points.quantile(points.ess, 0.1):.1f}"
        f" of {report.num_particles}; unreliable (k-hat >= 0.7 or ESS < {MIN_ESS:g}) at {int(bad.sum())} of {n}",
        "    KL bracket  inf by definition (q's support is wider than the model's)"
        if report.wider_supports
        else f"    KL bracket  median [{points.quantile(points.kl_lower, 0.5):.4g}, "
        f"{points.quantile(points.kl_upper, 0.5):.4g}] nats per point",
        f"    worst       {worst}",
    ]


def assess(report: KLGapReport) -> tuple[str, list[str]]:
    """The verdict line and the warnings of a report (see the README's ``kl_gap`` section)."""
    if report.wider_supports:
        return infinite_kl(report)
    if report.narrower_supports:
        return unverifiable_kl(report)
    lo, hi = report.kl_interval
    if not report.resolvable:
        return (
            f"exact to rounding: the KL is below the {report.noise_floor:.2g}-nat noise floor",
            [
                "the KL gap is below the floating-point noise floor: the guide is exact to rounding, "
                "or closer to the posterior than this dtype can resolve"
            ],
        )
    untrusted = (
        "every importance-sampling number in this report (IWAE, CUBO, their standard errors "
        "and the upper end of the bracket) is unreliable"
    )
    if report.reliable:
        if report.khat >= 0.5:
            return "ok: q is close enough for importance sampling, but CUBO is biased low", [
                f"k-hat {report.khat:.2f} > 0.5: w^2 has infinite variance, so the CUBO estimate (upper end) "
                "is biased low and its standard error too small"
            ]
        if hi <= GOOD_KL:
            return f"good: KL(q || p) <= {hi:.3g} nats and the importance weights are well behaved", []
        return f"the bracket is reliable: q is {lo:.3g} to {hi:.3g} nats from the posterior", []
    split = _per_point_verdict(report, untrusted)
    if split is not None:
        return split
    weak = f"k-hat {report.khat:.2f}" + (
        f", ESS {report.ess:.1f} of {report.num_particles}" if report.ess < MIN_ESS else ""
    )
    bulk = report.log_w_sd**2 / 2
    if bulk <= SMALL_KL and report.gap_lower.value <= SMALL_KL:
        return "KL small, but the importance weights are heavy-tailed (q's tails are too light)", [
            f"{weak}: log w varies little (sd {report.log_w_sd:.3g} nats; KL ~ var/2 = {bulk:.2g} nats to "
            "second order), so q matches the posterior where q puts its mass, but q's tails are lighter than "
            f"the posterior's and the importance weights are heavy-tailed: {untrusted}"
        ]
    return "BAD: q is too far from the posterior for importance sampling", [
        f"{weak}: a few particles carry the importance weight, so q is too far from the posterior for "
        f"importance sampling (KL >= {lo:.3g} nats, possibly much more): {untrusted}"
    ]


def infinite_kl(report: KLGapReport) -> tuple[str, list[str]]:
    """The verdict of a guide whose support is wider than the model's: KL = inf by definition,
    and what the draws measured (the bracket of q restricted to the model's support)."""
    sites = "; ".join(report.wider_supports)
    n, m = report.num_particles, report.outside_draws
    drawn = (
        f"{m} of {n * report.num_points} draws ({n} particles x {report.num_points} data points)"
        if (report.num_points > 1)
        else f"{m} of {n} draws"
    )
    verdict = f"infinite: KL(q || p) = inf by definition, because {sites}"
    if report.restricted_kl is None:
        measured = "every draw of some data point fell outside the model's support"
    else:
        lo, hi = report.restricted_kl
        measured = (
            f"restricted to the model's support and renormalized, q is {lo:.4g} (IWAE_{n} - ELBO) to {hi:.4g} "
            "(CUBO_2 - ELBO) nats from the posterior (estimates from the draws inside"
            + ("" if report.reliable else f"; unreliable: k-hat {report.khat:.2f}, ESS {report.ess:.1f}")
            + ")"
        )
    return verdict, [
        f"KL(q || p(z | x)) is infinite: q puts mass where p(z | x) = 0 ({sites}), so the ELBO is -inf in "
        f"expectation. Its draws: {drawn} fell outside the model's support (log w = -inf); {measured}. "
        "IWAE and CUBO still bracket log p(x) (the weights outside are zero). Fix: a guide distribution on the "
        "model's support, or an autoguide such as AutoNormal, which transforms into it"
    ]


def unverifiable_kl(report: KLGapReport) -> tuple[str, list[str]]:
    """The verdict of a guide whose support is narrower than the model's: its draws cannot see
    posterior mass outside it, so only the lower ends of the bracket hold."""
    sites = "; ".join(report.narrower_supports)
    lo = report.kl_interval[0]
    return (
        f"unverifiable: KL(q || p) >= {lo:.4g} nats, no upper end, because {sites}",
        [
            f"q's support is narrower than the model's ({sites}): q's draws cannot see posterior mass outside "
            "it, so IWAE (a lower bound of log p(x)) and IWAE - ELBO (of the KL) still hold, but CUBO bounds "
            "only the mass inside q's support, and this report claims no upper end. If the likelihood is zero "
            "outside q's support, the bracket holds; to check, give the guide the model's support (or use an "
            "autoguide such as AutoNormal, which transforms into it)"
        ],
    )


#: standard errors a bound may stray past another before the two contradict each other
#: (one-sided false-alarm rate 3e-5 per comparison for Gaussian errors)
CONTRADICTION_Z = 4.0

#: verdicts that claim something (a small KL, or trustworthy importance sampling)
CLAIMS = ("exact", "good", "ok", "the bracket is reliable")


def contradictions(report: KLGapReport) -> list[str]:
    """Where the verdict disagrees with the report's own numbers, each naming both.

    Checked: ESS and k̂ against a verdict that trusts importance sampling; an "exact" verdict
    against the share of effective particles (the noise floor alone never decides it); the
    ladder ``ELBO <= IWAE_K <= CUBO_2`` within ``CONTRADICTION_Z`` standard errors and the noise
    floor (ELBO above an IWAE bound contradicts every verdict; CUBO below IWAE a trusted bracket);
    and the lower end of the bracket against the KL a "good" or "exact" verdict claims."""
    verdict, found = report.verdict, []
    claim = verdict.split(":")[0]
    claims = verdict.startswith(CLAIMS)
    floor, n = report.noise_floor, report.num_particles
    for wider in report.wider_supports if claims else ():
        found.append(f"the verdict '{claim}' against {wider}: the KL is infinite")
    for narrower in report.narrower_supports if claims else ():
        found.append(f"the verdict '{claim}' against {narrower}: the draws cannot see mass outside it")
    if claims and report.replay_error > 0:
        found.append(f"the verdict '{claim}' against {randomness_text(report)}")
    for edge in report.support_edges if claims else ():
        found.append(f"the verdict '{claim}' against {edge}")
    if claims and report.precision_losses and report.dtype != torch.float64:
        found.append(f"the verdict '{claim}' against {precision_text(report, rerun=False)}")
    if claims and report.ess < MIN_ESS:
        found.append(f"the verdict '{claim}' against ESS {report.ess:.1f} of {n}: a few particles carry the weight")
    if claims and report.khat > 0.7:
        found.append(f"the verdict '{claim}' against k-hat {report.khat:.2f} > 0.7: heavy-tailed importance weights")
    if verdict.startswith("exact") and not report.ess >= EXACT_ESS_SHARE * n:
        found.append(
            f"'exact to rounding' (noise floor {floor:.3g} nats) against ESS {report.ess:.1f} of {n}: the weights "
            f"vary beyond rounding (log w sd {report.log_w_sd:.3g} nats), so the floor cannot decide the verdict"
        )
    elbo = report.elbo
    for k, est in sorted(report.iwae.items()):
        diff = elbo - est
        if k > 1 and diff.value > CONTRADICTION_Z * diff.se + floor:
            found.append(
                f"ELBO {elbo.value:.4f} above IWAE_{k} {est.value:.4f} by {diff.value:.3g} nats "
                f"({diff.value / max(diff.se, 1e-300):.1f} standard errors): a lower bound cannot exceed a tighter one"
            )
            break
    top = report.iwae[max(report.iwae)]
    excess = top - report.cubo
    trusted = verdict.startswith(("exact", "good", "the bracket is reliable"))
    if trusted and excess.value > CONTRADICTION_Z * excess.se + floor:
        found.append(
            f"the verdict '{claim}' against CUBO_2 {report.cubo.value:.4f} below IWAE_{max(report.iwae)} "
            f"{top.value:.4f} by {excess.value:.3g} nats: the upper bound is biased low"
        )
    low = report.gap_lower
    if verdict.startswith(("exact", "good")):
        claimed = (
            floor if verdict.startswith("exact") else report.gap_upper.value + Z_TEXT * report.gap_upper.se + floor
        )
        if low.value - CONTRADICTION_Z * low.se > claimed:
            found.append(
                f"the verdict '{claim}' (KL <= {claimed:.3g} nats) against IWAE_{max(report.iwae)} - ELBO = "
                f"{low.value:.4g} ± {low.se:.2g} nats, a lower bound on the KL"
            )
    return found


def randomness_text(report: KLGapReport) -> str:
    """What the report found about randomness outside the sample sites, and the fix."""
    where = (
        "a module in training mode: " + ", ".join(report.random_modules) + "; call .eval() on it before kl_gap"
        if report.random_modules
        else "no module in training mode was found: look for torch.rand/randn/dropout calls outside pyro.sample"
    )
    return (
        f"a program random beyond its sample sites (two evaluations at the same draws differ by up to "
        f"{report.replay_error:.3g} nats): {where}"
    )


def precision_text(report: KLGapReport, rerun: bool) -> str:
    """The sites whose working-dtype log-densities are wrong, and what was done about it."""
    dtype = str(report.dtype).replace("torch.", "")
    done = (
        "so this report was evaluated in float64 (parameters, modules and data upcast)"
        if rerun
        else "and the program could not run in float64: run it in float64 yourself"
    )
    return (
        f"in {dtype} (checked against float64 at the same draws): " + "; ".join(report.precision_losses) + f"; {done}"
    )


def check_consistency(report: KLGapReport) -> None:
    """Replace a verdict its own report contradicts by one that claims nothing, with a warning
    naming the numbers that disagree (every report passes through here before it is returned)."""
    found = contradictions(report)
    report.contradictions = found
    if not found:
        report.warnings.extend(report.support_edges)
    if report.replay_error > 0 and not found:
        report.warnings.insert(0, f"{randomness_text(report)}; the bounds are those of the randomized program")
    if not found:
        return
    claim = report.verdict.split(":")[0]
    report.verdict = f"inconsistent: '{claim}' is contradicted by the report's own numbers (see the warnings)"
    report.warnings = [
        f"contradiction: {message}; this report claims nothing about the KL beyond its lower end" for message in found
    ] + [w for w in report.warnings if "below the floating-point noise floor" not in w]
