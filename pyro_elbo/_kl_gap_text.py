"""The printed table and the figure of a :class:`~pyro_elbo.kl_gap.KLGapReport`."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyro_elbo.kl_gap import KLGapReport

MEANING = ("(each end: its bound -/+ 2 standard errors and the noise floor; unless a warning below says "
           "otherwise, the truth lies inside in about 95% of runs)")


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
    if report.resolvable:
        lines.append(f"  KL(q || p)  {_interval(*report.kl_interval)}")
    else:
        lines.append(f"  KL(q || p)  not resolvable: below the {report.noise_floor:.2g} nat rounding noise floor")
    lines.append(f"              {MEANING}")
    lines.append(f"  noise floor {report.noise_floor:.3g} nats ({report.floor_source})")
    lines.append(f"  PSIS k-hat  {report.khat:.3f}")
    lines.append(f"  ESS         {report.ess:.1f} of {report.num_particles}")
    lines.append(f"  verdict     {report.verdict}")
    if report.khat_per_site:
        lines.append("  k-hat per site (its share of log w):")
        ranked = sorted(report.khat_per_site.items(), key=_site_rank)
        for site, site_khat in ranked:
            lines.append(f"    {site:<20}{site_khat:>8.3f}   {_site_verdict(site_khat)}")
    if report.joint_sites:
        shared = sorted({aux for auxs in report.joint_sites.values() for aux in auxs})
        lines.append(f"    {', '.join(sorted(report.joint_sites))}: joint guide density ({', '.join(shared)}), "
                     "no per-site share")
    for message in report.warnings:
        lines.append(f"  warning: {message}")
    return "\n".join(lines)


def report_plot(report: KLGapReport, ax: Any = None) -> Any:
    import matplotlib

    if ax is None:
        matplotlib.use(matplotlib.get_backend())
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
    else:
        fig = ax.figure
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
    ax.set_title(f"KL(q‖p) ∈ [{kl_lo:.3g}, {kl_hi:.3g}],  k̂ = {report.khat:.2f}", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig
