"""Random Pyro programs with exactly known answers (tests/program_generator.py) as the test of the
diagnostics and of the ELBO. Every failure prints the program as Pyro code.

Invariants on every program:

- ``pyro_elbo.ELBO()`` equals Pyro's ``Trace_ELBO`` on the same draws, value and gradients
  (relative 1e-5 in float64, 1e-3 in float32, plus an absolute 1e-6 x the loss's size);
- the exact log p(x) and KL lie inside the report's bounds widened to 4.75 standard errors
  (one-sided false-alarm rate 1e-6 each) and the noise floor, unless the report warns;
  the printed 2-se intervals' misses are counted per cell (the slow run prints the rates);
- no "good" or "exact" verdict when the exact KL exceeds 0.1 nats;
- no contradiction survives: the verdict either agrees with ESS, k-hat and the ladder, or says
  "inconsistent";
- per-point results have one entry per data point (``log_evidence`` and ``kl_gap``);
- a subsampled plate is refused by name; a module in training mode is named.
"""

from __future__ import annotations

import collections
import math
import warnings
from dataclasses import dataclass, field

import pyro
import pytest
import torch
from generated_regressions import REGRESSIONS
from program_generator import Program, build, estimate_kl, generate

import pyro_elbo
from pyro_elbo._kl_gap_text import contradictions
from pyro_elbo.kl_gap import MIN_ESS

Z_HARD = 4.75
#: the default suite's programs (seconds); the slow run's
DEFAULT_SEEDS = range(12)
SLOW_SEEDS = range(1000, 3000)


@dataclass
class Outcome:
    violations: list[str] = field(default_factory=list)
    checked: bool = False  # the interval was compared with an exact answer
    miss: bool = False  # the printed (2-se) interval missed, with no warning
    verdict: str = ""


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    rel = 1e-3 if dtype == torch.float32 else 1e-5
    return bool(torch.allclose(a.double(), b.double(), rtol=rel, atol=rel * (1 + float(b.abs().max()))))


def check_parity(program: Program, out: Outcome) -> None:
    """ELBO() against Trace_ELBO on the same draws: value and gradients."""
    model, guide, data = program.model, program.guide, program.data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pyro.infer.Trace_ELBO().loss(model, guide, data)  # creates lazily initialized parameters
    params = [p.unconstrained() for _, p in pyro.get_param_store().items()]
    losses = []
    for loss in (pyro_elbo.ELBO(), pyro.infer.Trace_ELBO()):
        pyro.set_rng_seed(program.seed)
        value = loss.differentiable_loss(model, guide, data)
        grads = torch.autograd.grad(value, params, allow_unused=True) if params and value.requires_grad else ()
        losses.append((value.detach(), [torch.zeros(()) if g is None else g for g in grads]))
    (ours, ours_g), (theirs, theirs_g) = losses
    dtype = torch.get_default_dtype()
    if not _close(ours, theirs, dtype):
        out.violations.append(f"ELBO loss {float(ours):.8g} != Trace_ELBO {float(theirs):.8g} on the same draws")
    for a, b in zip(ours_g, theirs_g):
        if not _close(a, b, dtype):
            out.violations.append(f"ELBO gradient {a.tolist()} != Trace_ELBO's {b.tolist()}")
            break


def check_program(program: Program, num_particles: int) -> Outcome:
    out = Outcome()
    check_parity(program, out)
    model, guide, data = program.model, program.guide, program.data
    if program.plate == "subsampled":
        with pytest.raises(ValueError, match="subsampled"):
            pyro_elbo.kl_gap(model, guide, data, num_particles=100, per_site=False)
        return out
    if program.kl is None and program.guide_kind != "dropout":
        estimate_kl(program)
    report = pyro_elbo.kl_gap(model, guide, data, num_particles=num_particles, per_site=False)
    evidence = pyro_elbo.log_evidence(model, guide, data, num_particles=200)
    out.verdict = report.verdict
    claims = report.verdict.startswith(("good", "exact"))
    # per-point results: one entry per data point
    if report.num_points != program.points or len(evidence.per_point) != program.points:
        out.violations.append(
            f"{program.points} data points, but kl_gap has {report.num_points} and log_evidence "
            f"{len(evidence.per_point)}"
        )
    if program.points > 1 and (report.per_point is None or report.per_point.khat.numel() != program.points):
        out.violations.append("report.per_point does not hold one entry per data point")
    # no surviving contradiction
    if not report.verdict.startswith("inconsistent") and contradictions(report):
        out.violations.append(f"contradiction survived: {contradictions(report)}")
    if claims and (report.ess < MIN_ESS or report.khat >= 0.7):
        out.violations.append(f"verdict {report.verdict!r} next to ESS {report.ess:.1f}, k-hat {report.khat:.2f}")
    if program.guide_kind == "dropout":
        if claims or not any(m.startswith("Dropout at") for m in report.random_modules):
            out.violations.append(
                f"dropout in training mode: verdict {report.verdict!r}, named {report.random_modules}"
            )
        return out
    assert program.kl is not None
    kl_low = program.kl - Z_HARD * program.kl_se
    if claims and kl_low > 0.1:
        out.violations.append(f"verdict {report.verdict!r} for a guide {program.kl:.4g} nats from the posterior")
    if program.kl_se > 0.02:  # the Monte Carlo KL is too noisy to test an interval with
        return out
    out.checked = True
    lo, hi = report.kl_interval
    elo, ehi = report.log_evidence_interval
    truth_kl, truth_lp = program.kl, program.log_evidence
    inside = lo <= truth_kl + 3 * program.kl_se and truth_kl - 3 * program.kl_se <= hi and elo <= truth_lp <= ehi
    out.miss = not inside and not report.warnings
    floor = report.noise_floor
    low, top = report.gap_lower, report.iwae[max(report.iwae)]
    wide_lo = low.value - Z_HARD * low.se - floor - Z_HARD * program.kl_se
    wide_elo = top.value - Z_HARD * top.se - floor
    if not report.warnings and (wide_lo > truth_kl or wide_elo > truth_lp):
        out.violations.append(
            f"lower ends past the truth at {Z_HARD} se: KL >= {wide_lo:.6g} vs exact {truth_kl:.6g}, "
            f"log p >= {wide_elo:.6g} vs exact {truth_lp:.6g}, no warning"
        )
    if not report.warnings and math.isfinite(hi):
        up, cubo = report.gap_upper, report.cubo
        if up.value + Z_HARD * up.se + floor + Z_HARD * program.kl_se < truth_kl:
            out.violations.append(f"upper end of the KL below the truth at {Z_HARD} se: {up} vs {truth_kl:.6g}")
        if cubo.value + Z_HARD * cubo.se + floor < truth_lp:
            out.violations.append(f"CUBO below the exact log p(x) at {Z_HARD} se: {cubo} vs {truth_lp:.6g}")
    return out


def _run(seed: int, num_particles: int) -> tuple[Program, Outcome]:
    pyro.clear_param_store()
    program = generate(seed)
    try:
        with warnings.catch_warnings():  # a model not written for batched latents takes another path
            warnings.simplefilter("ignore", pyro_elbo.ParticlePathWarning)
            outcome = check_program(program, num_particles)
    except Exception as error:  # a crash is a failure of the program's check, printed with the program
        raise AssertionError(f"{type(error).__name__}: {error}\n{program}") from error
    return program, outcome


@pytest.mark.parametrize("seed", DEFAULT_SEEDS)
def test_generated_program(seed: int) -> None:
    program, outcome = _run(seed, num_particles=2000)
    assert not outcome.violations, "\n".join(outcome.violations) + "\n" + str(program)


@pytest.mark.parametrize("seed", sorted(REGRESSIONS))
def test_program_the_generator_found_a_lie_in(seed: int) -> None:
    """Each program as it was generated when it exposed a lie (``why``), from its pinned source."""
    spec = dict(REGRESSIONS[seed])
    spec.pop("why")
    source = str(spec.pop("source"))
    program = Program(seed=seed, source=source, **spec)  # type: ignore[arg-type]
    program.namespace = build(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyro_elbo.ParticlePathWarning)
        outcome = check_program(program, num_particles=2000)
    assert not outcome.violations, "\n".join(outcome.violations) + "\n" + str(program)


@pytest.mark.slow
def test_generated_programs_sweep() -> None:
    """Two thousand programs (about 10 minutes on one core); prints per-cell miss rates of the
    printed intervals (unwarned)."""
    cells: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])
    failures = []
    for seed in SLOW_SEEDS:
        program, outcome = _run(seed, num_particles=4000)
        cell = cells[program.cell]
        cell[0] += 1
        cell[1] += outcome.checked
        cell[2] += outcome.miss
        if outcome.violations:
            failures.append(f"seed {seed}: " + "; ".join(outcome.violations) + "\n" + str(program))
    print(f"\n{len(SLOW_SEEDS)} generated programs; unwarned misses of the printed intervals per cell")
    print(f"  {'cell':<44}{'programs':>9}{'checked':>9}{'misses':>8}")
    for name in sorted(cells):
        n, checked, misses = cells[name]
        rate = f"{misses / checked:.1%}" if checked else "-"
        print(f"  {name:<44}{n:>9}{checked:>9}{rate:>8}")
    assert not failures, "\n\n".join(failures[:5])
