"""Pyro's examples folder as the standard: every SVI model of Pyro's examples and tutorials
(``tests/pyro_examples_models.py``) through every entry point (``benchmarks/pyro_examples.py``).

The default suite checks the harness's cells on the smallest example (seconds). The ``slow`` sweep
checks that every example runs under Pyro's own loss and runs one cell per (model, entry point),
asserting it is ``ok`` (or ``n/a``: no observed site, no parameter); a cell that the recorded run
(``benchmarks/pyro_examples_results``) found not ok is marked ``xfail(strict=True)`` with the
harness's reason, so it turns red the day it starts to pass; whoever fixes it reruns the harness on
that model (``--models NAME --redo``), which updates the record, the mark and the table.
``PYRO_EXAMPLES_SURVEY=1`` drops every mark.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyro
import pytest
from pyro_examples_models import EXAMPLES, EXCLUDED

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import pyro_examples as harness  # noqa: E402  (benchmarks/ is not a package)

RESULTS = ROOT / "benchmarks" / "pyro_examples_results"


def known_not_ok() -> dict[tuple[str, str], str]:
    """(model, entry point) -> why the cell is not ok, from the harness's recorded run
    (``benchmarks/pyro_examples_results``, the run the table in ``docs/pyro_examples.md`` shows);
    cells that run was stopped before are not marked: they must pass."""
    known = {}
    for name in EXAMPLES:
        for entry_point, cell in harness.load(RESULTS, name).items():
            if cell.get("status") in ("refused", "fails", "fallback"):
                known[(name, entry_point)] = f"{cell['status']}: {cell.get('detail', '')}"
    return known


def _cells() -> list[Any]:
    survey = os.environ.get("PYRO_EXAMPLES_SURVEY") == "1"
    known = known_not_ok()
    cells = []
    for name in EXAMPLES:
        for entry_point in harness.ENTRY_POINTS:
            marks: list[Any] = [pytest.mark.slow]
            reason = known.get((name, entry_point))
            if reason is not None and not survey:
                marks.append(pytest.mark.xfail(strict=True, reason=reason))
            cells.append(pytest.param(name, entry_point, marks=marks, id=f"{name}-{entry_point}"))
    return cells


@pytest.mark.slow  # ~10 s: builds every example (digits, ArviZ's data, flows)
@pytest.mark.filterwarnings("ignore")  # Pyro's and the examples' own warnings are not results here
def test_every_example_runs_under_pyros_own_loss() -> None:
    """Each factory builds a fresh example whose loss under Pyro's estimator is finite."""
    for name, factory in EXAMPLES.items():
        pyro.clear_param_store()
        entry = factory()
        assert entry.name == name
        loss = entry.pyro_loss().loss(entry.model, entry.guide, *entry.args, **entry.kwargs)
        assert math.isfinite(loss), name
    assert len(EXAMPLES) + len(EXCLUDED) >= 30


def test_harness_cells_on_the_smallest_example(tmp_path: Path) -> None:
    """Every cheap cell of the harness on minipyro's model is ok, and a finished cell is saved,
    reloaded and tabulated."""
    cells = {e: harness.run_cell("minipyro", e, budget=120.0) for e in harness.CHEAP}
    assert {e: c["status"] for e, c in cells.items()} == dict.fromkeys(harness.CHEAP, "ok"), cells
    harness.save(tmp_path, "minipyro", cells)
    assert harness.load(tmp_path, "minipyro") == json.loads(json.dumps(cells))
    text, not_ok, total = harness.table(["minipyro"], tmp_path)
    assert total == len(harness.ENTRY_POINTS) and not_ok == 2  # cli and compiled were not run
    assert "| minipyro | Trace_ELBO | ok |" in text


def test_a_cell_past_its_budget_is_not_run() -> None:
    """The time budget stops a cell and records it as not run, not as a failure."""
    cell = harness.run_cell("vae", "kl_gap", budget=0.01)
    assert cell["status"] == "not run" and "budget" in cell["detail"], cell
    assert not pyro.poutine.runtime._PYRO_STACK  # no handler of the stopped cell is left active


@pytest.mark.parametrize("name, entry_point", _cells())
def test_cell(name: str, entry_point: str) -> None:
    budget = 600.0 if entry_point == "compiled" else 300.0
    cell = harness.run_cell(name, entry_point, budget=budget)
    assert cell["status"] in ("ok", "n/a"), f"{cell['status']}: {cell['detail']}"


@pytest.mark.slow
def test_harness_resumes_and_runs_a_subset(tmp_path: Path) -> None:
    """Two models, two entry points, in the harness's child process; a second run finds every cell
    done and runs nothing."""
    command = [sys.executable, str(ROOT / "benchmarks" / "pyro_examples.py"), "--models", "minipyro,svi_part_i",
               "--entry-points", "elbo,fit", "--results", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "minipyro elbo: ok" in first.stdout and "svi_part_i fit: ok" in first.stdout
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0 and ": ok (" not in second.stdout, second.stdout
    assert "| minipyro | Trace_ELBO | ok | not run | not run | not run | ok |" in second.stdout
