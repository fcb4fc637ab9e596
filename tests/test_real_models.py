"""Every entry point on every model of the zoo of real Pyro models (``tests/pyro_models.py``).

One test per (model, entry point). A cell that fails today is marked
``xfail(strict=True, reason="issue N: ...")`` in :data:`KNOWN_FAILURES`, so it turns red the day it
starts to pass; whoever fixes it removes the mark. ``ZOO_SURVEY=1`` drops every mark, which prints
the plain works/fails matrix (``pytest -rA``).

Compilation with inductor costs tens of seconds per model on two cores, so the default suite checks
the captured graph with ``compile_backend="eager"`` (same draws as the eager path, so the two runs
must agree to float rounding) and the inductor cells are ``slow``; so are the CLI cells of the
heaviest models.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyro
import pytest
import torch
from pyro_models import ZOO, ZooEntry, cli_model_file

import pyro_elbo

#: a model that cannot take a particle plate says so once; expected for half the zoo
pytestmark = pytest.mark.filterwarnings("ignore::pyro_elbo.ParticlePathWarning")

PACKED = (
    "compile=True falls back to eager: the guide packs its sequences (pack_padded_sequence), whose "
    "layout comes from the values of the lengths; the warning names the line and suggests masks"
)

#: (model, entry point) -> why it fails today (survey of 2026-11-27)
KNOWN_FAILURES: dict[tuple[str, str], str] = {
    ("dmm", "fit_compile_parity"): PACKED,
    ("dmm", "fit_compile_inductor"): PACKED,
}

#: cells too slow for the default suite (seconds on two cores, measured 2026-11-27)
SLOW: set[tuple[str, str]] = {
    ("bnaf_guide", "fit_compile_parity"),  # 29 s: capturing the BNAF guide
    ("eight_schools", "fit_compile_parity"),  # 15 s
    ("iaf_guide", "fit_compile_parity"),  # 8 s
    ("vae", "fit_compile_parity"),  # 6 s
    ("sparse_gamma_def", "fit_compile_parity"),  # 6 s
    *{
        (m, "cli")
        for m in (
            "vae",
            "sparse_gamma_def",
            "dmm",
            "iaf_guide",
            "bnaf_guide",
            "eight_schools",
            "baseball_logit",
            "baseball_pooled",
        )
    },  # 4-10 s each (tests/test_cli.py covers the CLI)
}

ENTRY_POINTS = [
    "elbo_equals_pyro",
    "iwae",
    "dreg",
    "kl_gap",
    "arviz_loo",
    "fit_compile_parity",
    "cli",
    "fit_compile_inductor",
]
ALWAYS_SLOW = {"fit_compile_inductor"}


def _params() -> list[Any]:
    survey = os.environ.get("ZOO_SURVEY") == "1"
    cells = []
    for name in ZOO:
        for entry_point in ENTRY_POINTS:
            marks: list[Any] = []
            if entry_point in ALWAYS_SLOW or (name, entry_point) in SLOW:
                marks.append(pytest.mark.slow)
            reason = KNOWN_FAILURES.get((name, entry_point))
            if reason is not None and not survey:
                marks.append(pytest.mark.xfail(strict=True, reason=reason))
            cells.append(pytest.param(name, entry_point, marks=marks, id=f"{name}-{entry_point}"))
    return cells


def _tolerance(value: float) -> float:
    """Rounding tolerance of a sum of O(1000) float terms in the default dtype."""
    return 1e3 * torch.finfo(torch.get_default_dtype()).eps * max(1.0, abs(value))


def _warm_up(entry: ZooEntry) -> None:
    """Create every parameter (lazy pyro.param inits, autoguide prototypes) before comparing draws."""
    entry.pyro_loss().loss(entry.model, entry.guide, *entry.args, **entry.kwargs)


def elbo_equals_pyro(entry: ZooEntry, tmp_path: Path) -> None:
    """ELBO() and Pyro's estimator (TraceEnum_ELBO if enumerated) on the same draws: same loss."""
    _warm_up(entry)
    pyro.set_rng_seed(1)
    ours = pyro_elbo.ELBO().loss(entry.model, entry.guide, *entry.args, **entry.kwargs)
    pyro.set_rng_seed(1)
    theirs = entry.pyro_loss().loss(entry.model, entry.guide, *entry.args, **entry.kwargs)
    assert math.isfinite(ours)
    assert abs(ours - theirs) <= _tolerance(theirs), (ours, theirs)


def _backward_is_finite(objective: pyro_elbo.Objective, entry: ZooEntry) -> None:
    """On the full data: IWAE and DReG refuse subsampled global latents (see the test below)."""
    _warm_up(entry)
    loss = objective.differentiable_loss(entry.model, entry.guide, *entry.full_args, **entry.kwargs)
    assert torch.isfinite(loss)
    params = [p.unconstrained() for p in pyro.get_param_store().values()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads), "no parameter gets a gradient"
    assert all(g is None or bool(torch.isfinite(g).all()) for g in grads)


def iwae(entry: ZooEntry, tmp_path: Path) -> None:
    _backward_is_finite(pyro_elbo.IWAE(num_particles=4), entry)


def dreg(entry: ZooEntry, tmp_path: Path) -> None:
    _backward_is_finite(pyro_elbo.DReG(num_particles=4), entry)


def kl_gap(entry: ZooEntry, tmp_path: Path) -> None:
    _warm_up(entry)
    with warnings.catch_warnings():
        # the report's own cautions (few particles, high k-hat) are not failures here
        warnings.simplefilter("ignore", UserWarning)
        report = pyro_elbo.kl_gap(entry.model, entry.guide, *entry.full_args, num_particles=64, **entry.kwargs)
    assert math.isfinite(report.elbo.value) and math.isfinite(max(e.value for e in report.iwae.values()))


def arviz_loo(entry: ZooEntry, tmp_path: Path) -> None:
    import arviz as az

    _warm_up(entry)
    idata = pyro_elbo.to_inference_data(entry.model, entry.guide, *entry.full_args, num_samples=50, **entry.kwargs)
    observed = list(idata.log_likelihood.data_vars)
    assert observed, "no log_likelihood group"
    with warnings.catch_warnings():
        # az.loo warns when Pareto k is high, as it will be for 50 draws of an untrained guide
        warnings.simplefilter("ignore", UserWarning)
        for var_name in observed:  # az.loo takes one observed site at a time (the DMM has one per step)
            loo = az.loo(idata, var_name=var_name)
            assert math.isfinite(float(loo.elpd_loo)), var_name


def _fit(entry: ZooEntry, **options: Any) -> tuple[pyro_elbo.FitResult, list[str]]:
    """Three steps from the entry's seeded initial state; returns the result and any fallback warnings."""
    pyro.clear_param_store()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pyro_elbo.fit(
            entry.model,
            entry.guide,
            *entry.args,
            num_steps=3,
            lr=0.01,
            seed=0,
            progress=False,
            **options,
            **entry.kwargs,
        )
    fallbacks = [str(w.message) for w in caught if "falling back" in str(w.message)]
    return result, fallbacks


def fit_compile_parity(entry: ZooEntry, tmp_path: Path) -> None:
    """The captured step (not compiled: backend "eager", the same draws as eager) takes the same
    three steps as eager training: same losses, same parameters (a frozen parameter would differ)."""
    name = entry.name
    eager, _ = _fit(ZOO[name]())
    captured, fallbacks = _fit(ZOO[name](), compile=True, compile_backend="eager")
    assert not fallbacks, fallbacks[0]
    assert captured.compile_seconds is not None
    for a, b in zip(eager.history, captured.history):
        assert abs(a - b) <= _tolerance(a), (eager.history, captured.history)
    assert eager.params.keys() == captured.params.keys()
    for key, value in eager.params.items():
        torch.testing.assert_close(captured.params[key], value, msg=f"parameter {key} after 3 steps")


def fit_compile_inductor(entry: ZooEntry, tmp_path: Path) -> None:
    result, fallbacks = _fit(entry, compile=True)
    assert not fallbacks, fallbacks[0]
    assert result.compile_seconds is not None and all(math.isfinite(v) for v in result.history)


def cli(entry: ZooEntry, tmp_path: Path) -> None:
    """``pyro-elbo run FILE`` (in process: the same ``main`` the console script calls)."""
    from pyro_elbo import cli as cli_module

    path = tmp_path / f"{entry.name}_file.py"
    path.write_text(cli_model_file(entry.name))
    argv = [
        "run",
        str(path),
        "--steps",
        "2",
        "--samples",
        "20",
        "--diagnostic-particles",
        "20",
        "--no-progress",
        "--out",
        str(tmp_path / "out"),
    ]
    stderr = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("default")  # as a user's shell runs it: warnings print, they do not abort
        code = cli_module.main(argv)
    assert code == 0, stderr.getvalue().strip().splitlines()[:1]
    assert (tmp_path / "out" / "inference_data.nc").stat().st_size > 0


CELLS: dict[str, Callable[[ZooEntry, Path], None]] = {
    "elbo_equals_pyro": elbo_equals_pyro,
    "iwae": iwae,
    "dreg": dreg,
    "kl_gap": kl_gap,
    "arviz_loo": arviz_loo,
    "fit_compile_parity": fit_compile_parity,
    "fit_compile_inductor": fit_compile_inductor,
    "cli": cli,
}


@pytest.mark.parametrize("name, entry_point", _params())
def test_entry_point(name: str, entry_point: str, tmp_path: Path) -> None:
    CELLS[entry_point](ZOO[name](), tmp_path)


def test_zoo_entries_are_fresh_and_seeded() -> None:
    """Two calls of a factory give equal initial losses on the same draws (seeded construction, no
    shared state), and building an entry leaves the global random stream alone."""
    state = torch.get_rng_state()
    a, b = ZOO["vae"](), ZOO["vae"]()
    assert torch.equal(torch.get_rng_state(), state)
    assert a.model is not b.model
    losses = []
    for entry in (a, b):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        losses.append(entry.pyro_loss().loss(entry.model, entry.guide, *entry.args))
    assert losses[0] == losses[1]


def test_iwae_refuses_subsampled_global_latents_naming_the_plate() -> None:
    """IWAE is not linear in the log-weights, so a minibatch of documents cannot be rescaled to the
    corpus while the topics (global) are shared: a named refusal, not a silently biased bound."""
    entry = ZOO["lda_amortized"]()
    with pytest.raises(ValueError, match="documents"):
        pyro_elbo.IWAE(num_particles=4).differentiable_loss(entry.model, entry.guide, *entry.args)


def test_dmm_falls_back_naming_the_packing_and_the_line() -> None:
    """The DMM's guide packs its sequences: the one fallback warning says so in the user's terms
    (the line of the guide, pack_padded_sequence, masks as the way out), not in torch's."""
    entry = ZOO["dmm"]()
    _, fallbacks = _fit(entry, compile=True, compile_backend="eager")
    assert len(fallbacks) == 1, fallbacks
    message = fallbacks[0]
    assert "the guide" in message and "pack_padded_sequence" in message and "pyro_models.py:" in message, message
    assert "mask" in message and "compile=False" in message, message
    assert not any(internal in message for internal in ("u0", "zuf0", "GuardOnDataDependentSymNode")), message
