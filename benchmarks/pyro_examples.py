"""Every SVI model of Pyro's examples and tutorials (``tests/pyro_examples_models.py``) through every
entry point of ``pyro_elbo``: one cell per (model, entry point), each ``ok``, ``refused`` (a named
``ValueError``/``TypeError``/``NotImplementedError`` raised by ``pyro_elbo``, with its message),
``fails`` (any other error, or a value or gradient that differs from Pyro's), ``fallback`` (the
compiled step fell back to eager; the warning's first line) or ``not run`` (the cell ran past its
time budget).

Entry points (``--entry-points``), in the order they run:

- ``elbo``: ``pyro_elbo.ELBO()`` and Pyro's own loss for the example (``Trace_ELBO``,
  ``TraceEnum_ELBO``, ``TraceGraph_ELBO`` or ``TraceMeanField_ELBO``) on the same draws: equal
  losses, and equal gradients of ``loss_and_grads`` for every parameter (rounding tolerance);
- ``iwae``, ``dreg``, ``stl``: ``differentiable_loss`` and its gradients on the full data are finite
  and reach a parameter; a refusal of ``iwae`` says whether Pyro's ``RenyiELBO(alpha=0)`` runs;
- ``fit``: three eager steps of ``pyro_elbo.fit``, finite losses;
- ``kl_gap``: ``kl_gap`` with 64 particles, finite bracket;
- ``loo``: ``to_inference_data`` (40 draws) and ``az.loo`` on every observed site;
- ``log_evidence``: ``log_evidence`` with 64 particles, finite per-point values;
- ``cli``: ``pyro-elbo run FILE --steps 2`` on a model file serving the example (in process);
- ``compiled``: three steps of ``fit(compile=True)`` (inductor), no fallback, finite losses.

Models run one after another in a child process, each cell under a time budget (``--budget``
seconds; compiled cells ``--compile-budget``); every finished cell is written to ``--results``
(one JSON file per model), so a run resumes where it stopped, and ``--models a,b
--entry-points x,y`` runs a subset. The cheap entry points run for every model first, then the CLI,
then the compiled step (``--phases``).

    python benchmarks/pyro_examples.py                                   # everything, resumable
    python benchmarks/pyro_examples.py --models air,ss_vae_enum --entry-points elbo,iwae
    python benchmarks/pyro_examples.py --table docs/pyro_examples_table.md   # the table only

Prints the Markdown table and the count of cells that are not ``ok`` at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

CHEAP = ("elbo", "iwae", "dreg", "stl", "fit", "kl_gap", "loo", "log_evidence")
PHASES = {"cheap": CHEAP, "cli": ("cli",), "compiled": ("compiled",)}
ENTRY_POINTS = CHEAP + ("cli", "compiled")


class CellTimeout(Exception):
    """A cell ran past its time budget."""


class Differs(Exception):
    """A value or gradient differs from Pyro's on the same draws."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="all", help="comma-separated example names (default: all)")
    parser.add_argument("--entry-points", default="all", help=f"comma-separated, of {','.join(ENTRY_POINTS)}")
    parser.add_argument("--phases", default="cheap,cli,compiled", help="phases in order (default: all three)")
    parser.add_argument("--budget", type=float, default=120.0, help="seconds per cell (default: 120)")
    parser.add_argument("--compile-budget", type=float, default=300.0, help="seconds per compiled cell (default 300)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "pyro_examples_results"), help="JSON folder")
    parser.add_argument("--redo", action="store_true", help="run cells that already have a result again")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--table", default=None, help="write the Markdown table to this file (and print it)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- one cell ------------------------------------------------------------------------------------


@contextlib.contextmanager
def time_budget(seconds: float) -> Iterator[None]:
    """Raise :class:`CellTimeout` in the main thread after ``seconds`` (checked between Python lines)."""

    def handler(signum: int, frame: Any) -> None:
        raise CellTimeout(f"ran past its {seconds:.0f} s budget")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:400]


def _where(error: BaseException) -> str:
    """``file:line`` of the innermost frame (the package's own line for a refusal)."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f"{Path(last.filename).name}:{last.lineno}"


def classify(error: BaseException) -> tuple[str, str]:
    """``refused`` for a ValueError/TypeError/NotImplementedError raised inside ``pyro_elbo``, ``not run``
    for a timeout, ``fails`` for everything else."""
    if isinstance(error, CellTimeout):
        return "not run", f"time: {error}"
    if isinstance(error, Differs):
        return "fails", str(error)[:400]
    frames = traceback.extract_tb(error.__traceback__)
    raised_in_package = bool(frames) and f"{os.sep}pyro_elbo{os.sep}" in frames[-1].filename
    if raised_in_package and isinstance(error, ValueError | TypeError | NotImplementedError):
        return "refused", _first_line(error)
    return "fails", f"{_first_line(error)} ({_where(error)})"


def _params() -> dict[str, Any]:
    import pyro

    return {name: p.unconstrained() for name, p in pyro.get_param_store().items()}


def _grads_of(objective: Any, entry: Any, steps: int) -> dict[str, Any]:
    """Gradients that the last of ``steps`` ``loss_and_grads`` calls (seeds 2, 3, ...) leaves on every
    parameter of the store."""
    import pyro

    for step in range(steps):
        for p in _params().values():
            p.grad = None
        pyro.set_rng_seed(2 + step)
        objective.loss_and_grads(entry.model, entry.guide, *entry.args, **entry.kwargs)
    return {name: (None if p.grad is None else p.grad.detach().clone()) for name, p in _params().items()}


def _tolerance(value: float) -> float:
    import torch

    return 1e4 * torch.finfo(torch.get_default_dtype()).eps * max(1.0, abs(value))


def _warm_up(entry: Any, full: bool = False) -> None:
    """Create every parameter (lazy ``pyro.param`` inits, autoguide prototypes) on the arguments the
    cell then uses (an autoguide keeps the subsample size of its first call)."""
    args = entry.full_args if full else entry.args
    entry.pyro_loss().loss(entry.model, entry.guide, *args, **entry.kwargs)


def cell_elbo(entry: Any, tmp: Path) -> str:
    import pyro
    from pyro.infer import TraceGraph_ELBO as TraceGraph

    import pyro_elbo

    _warm_up(entry)
    store = pyro.get_param_store()
    state = store.get_state()
    # TraceMeanField_ELBO takes KL(q || p) in closed form where it is known: so does ELBO(analytic_kl=True)
    analytic = {"analytic_kl": entry.pyro_loss_name == "TraceMeanField_ELBO"}
    ours = pyro_elbo.ELBO(**analytic)
    theirs = entry.pyro_loss()
    pyro.set_rng_seed(1)
    a = ours.loss(entry.model, entry.guide, *entry.args, **entry.kwargs)
    store.set_state(state)
    pyro.set_rng_seed(1)
    b = theirs.loss(entry.model, entry.guide, *entry.args, **entry.kwargs)
    if not (math.isfinite(a) and abs(a - b) <= _tolerance(b)):
        raise Differs(f"loss {a:.6g} vs {entry.pyro_loss_name} {b:.6g}")
    baselines = _baseline_sites(entry)
    # a fresh objective has no running baseline: the same score-function terms as Pyro's first step;
    # a guide with Pyro's baseline options is compared on the second step too (the baselines' state)
    steps = 2 if baselines else 1
    fresh = pyro_elbo.ELBO(**analytic)
    store.set_state(state)
    ga = _grads_of(fresh, entry, steps)
    references = [(entry.pyro_loss_name, entry.pyro_loss())]
    if entry.pyro_loss_name == "Trace_ELBO":  # Rao-Blackwellized score terms are TraceGraph_ELBO's
        references.append(("TraceGraph_ELBO", TraceGraph(max_plate_nesting=entry.max_plate_nesting)))
    differ: list[str] = []
    for label, reference in references:
        store.set_state(state)
        gb = _grads_of(reference, entry, steps)
        differ = _grad_differences(ga, gb)
        if not differ:
            also = f" (steps 1 and 2: baselines of {', '.join(baselines)})" if baselines else ""
            return f"loss {a:.6g} = {entry.pyro_loss_name}; gradients equal {label}'s{also}"
    where = f" on step {steps} (baselines of {', '.join(baselines)})" if baselines else ""
    raise Differs(f"loss equal; gradients differ from {entry.pyro_loss_name}{where}: " + ", ".join(differ[:4]))


def _baseline_sites(entry: Any) -> list[str]:
    """Guide sites with Pyro's ``infer={"baseline": ...}`` options."""
    from pyro import poutine

    trace = poutine.trace(entry.guide).get_trace(*entry.args, **entry.kwargs)
    return [name for name, site in trace.nodes.items() if site["type"] == "sample" and site["infer"].get("baseline")]


def _grad_differences(ga: dict[str, Any], gb: dict[str, Any]) -> list[str]:
    import torch

    differ = []
    for name in sorted(set(ga) | set(gb)):
        x, y = ga.get(name), gb.get(name)
        if x is None and y is None:
            continue
        x = torch.zeros_like(y) if x is None else x
        y = torch.zeros_like(x) if y is None else y
        scale = float(y.abs().max()) if y.numel() else 0.0
        if not torch.allclose(x, y, rtol=1e-6, atol=_tolerance(scale)):
            differ.append(f"{name} (max |diff| {float((x - y).abs().max()):.3g}, max |grad| {scale:.3g})")
    return differ


def _finite_backward(objective: Any, entry: Any) -> str:
    import pyro
    import torch

    _warm_up(entry, full=True)
    loss = objective.differentiable_loss(entry.model, entry.guide, *entry.full_args, **entry.kwargs)
    params = list(_params().values())
    if not params:
        raise _NoParams("the model and guide have no parameters")
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    if not torch.isfinite(loss):
        raise Differs(f"loss {float(loss)}")
    if not any(g is not None and bool(g.abs().sum() > 0) for g in grads):
        raise Differs("no parameter gets a gradient")
    if not all(g is None or bool(torch.isfinite(g).all()) for g in grads):
        raise Differs("non-finite gradient")
    del pyro  # imported for its side effect on the param store only
    return f"loss {float(loss):.6g}"


def cell_iwae(entry: Any, tmp: Path) -> str:
    import pyro

    import pyro_elbo

    try:
        return _finite_backward(pyro_elbo.IWAE(num_particles=4), entry)
    except (ValueError, TypeError, NotImplementedError):
        try:  # does Pyro's own importance-weighted bound run here?
            pyro.clear_param_store()
            renyi = pyro.infer.RenyiELBO(alpha=0.0, num_particles=4, max_plate_nesting=entry.max_plate_nesting)
            renyi.loss(entry.model, entry.guide, *entry.full_args, **entry.kwargs)
            pyro_runs = "Pyro's RenyiELBO(alpha=0) runs"
        except Exception as error:
            pyro_runs = f"Pyro's RenyiELBO(alpha=0) also refuses: {_first_line(error)[:120]}"
        raise _Annotated(pyro_runs) from None


class _Annotated(Exception):
    """Carries a note to append to the refusal being handled."""


def cell_dreg(entry: Any, tmp: Path) -> str:
    import pyro_elbo

    return _finite_backward(pyro_elbo.DReG(num_particles=4), entry)


def cell_stl(entry: Any, tmp: Path) -> str:
    import pyro_elbo

    return _finite_backward(pyro_elbo.STL(num_particles=2), entry)


def _fit(entry: Any, **options: Any) -> tuple[Any, list[str]]:
    import pyro

    import pyro_elbo

    pyro.clear_param_store()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pyro_elbo.fit(
            entry.model, entry.guide, *entry.args, num_steps=3, lr=0.01, seed=0, progress=False,
            **options, **entry.kwargs,
        )  # fmt: skip
    fallbacks = [str(w.message) for w in caught if "falling back" in str(w.message)]
    if not all(math.isfinite(v) for v in result.history):
        raise Differs(f"non-finite loss in {result.history}")
    return result, fallbacks


def cell_fit(entry: Any, tmp: Path) -> str:
    result, _ = _fit(entry)
    return f"losses {', '.join(f'{v:.4g}' for v in result.history)}"


def cell_compiled(entry: Any, tmp: Path) -> str:
    result, fallbacks = _fit(entry, compile=True)
    if fallbacks:
        raise _Fallback(fallbacks[0].strip().splitlines()[0][:400])
    if result.compile_seconds is None and not result.params:  # nothing to train: fit stays eager and says why
        raise _NoParams(f"{result.compile_decision}; losses {', '.join(f'{v:.4g}' for v in result.history)}")
    return f"compiled in {result.compile_seconds:.0f} s; losses {', '.join(f'{v:.4g}' for v in result.history)}"


class _Fallback(Exception):
    """The compiled step fell back to eager."""


def cell_kl_gap(entry: Any, tmp: Path) -> str:
    import pyro_elbo

    _warm_up(entry, full=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the report's own cautions
        report = pyro_elbo.kl_gap(entry.model, entry.guide, *entry.full_args, num_particles=64, **entry.kwargs)
    best = max(e.value for e in report.iwae.values())
    if not (math.isfinite(report.elbo.value) and math.isfinite(best)):
        raise Differs(f"ELBO {report.elbo.value}, IWAE {best}")
    return f"ELBO {report.elbo.value:.4g}, IWAE-64 {best:.4g}"


def cell_loo(entry: Any, tmp: Path) -> str:
    import arviz as az

    import pyro_elbo

    _warm_up(entry, full=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # az.loo's Pareto-k caution for 40 draws
        warnings.simplefilter("ignore", FutureWarning)
        idata = pyro_elbo.to_inference_data(entry.model, entry.guide, *entry.full_args, num_samples=40, **entry.kwargs)
        if "log_likelihood" not in idata.groups():
            raise _NoObserved("exported; no log_likelihood group (the model observes nothing)")
        names = list(idata.log_likelihood.data_vars)
        elpd = [float(az.loo(idata, var_name=name).elpd_loo) for name in names]
    if not all(math.isfinite(v) for v in elpd):
        raise Differs(f"elpd_loo {elpd}")
    return f"{len(names)} observed site(s), elpd_loo {sum(elpd):.4g}"


class _NoObserved(Exception):
    """The model has no observed site: ``az.loo`` does not apply."""


class _NoParams(_NoObserved):
    """The model and guide have no parameters: no gradient to check."""


def cell_log_evidence(entry: Any, tmp: Path) -> str:
    import pyro_elbo

    _warm_up(entry, full=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        evidence = pyro_elbo.log_evidence(entry.model, entry.guide, *entry.full_args, num_particles=64, **entry.kwargs)
    total = float(evidence.total.value)
    if not math.isfinite(total):
        raise Differs(f"log p(x) {total}")
    return f"log p(x) {total:.4g} over {len(evidence.per_point)} point(s)"


def cell_cli(entry: Any, tmp: Path) -> str:
    from pyro_examples_models import cli_model_file

    from pyro_elbo import cli

    path = tmp / f"{entry.name}_file.py"
    path.write_text(cli_model_file(entry.name))
    argv = ["run", str(path), "--steps", "2", "--samples", "20", "--diagnostic-particles", "20", "--no-progress",
            "--out", str(tmp / "out")]  # fmt: skip
    stderr = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        code = cli.main(argv)
    if code != 0:
        lines = [line for line in stderr.getvalue().strip().splitlines() if "error" in line.lower()]
        raise Differs(f"exit {code}: {(lines or ['(no message)'])[0][:300]}")
    return "exit 0, inference_data.nc written"


CELLS: dict[str, Callable[[Any, Path], str]] = {
    "elbo": cell_elbo,
    "iwae": cell_iwae,
    "dreg": cell_dreg,
    "stl": cell_stl,
    "fit": cell_fit,
    "kl_gap": cell_kl_gap,
    "loo": cell_loo,
    "log_evidence": cell_log_evidence,
    "cli": cell_cli,
    "compiled": cell_compiled,
}


def run_cell(name: str, entry_point: str, budget: float) -> dict[str, Any]:
    """One cell in this process: a fresh example, a clean param store, the time budget."""
    import pyro
    from pyro_examples_models import EXAMPLES

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with time_budget(budget), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # particle-path notes and Pyro's own warnings are not results
                detail = CELLS[entry_point](EXAMPLES[name](), Path(tmp))
            status = "ok"
        except _Annotated as note:
            status, detail = classify(note.__context__ or note)
            detail = f"{detail}; {note}"
        except _Fallback as fallback:
            status, detail = "fallback", str(fallback)
        except _NoObserved as none:
            status, detail = "n/a", str(none)
        except BaseException as error:  # every failure is a cell of the table, not a crash
            if isinstance(error, KeyboardInterrupt):
                raise
            status, detail = classify(error)
            if isinstance(error, CellTimeout):  # the alarm can stop a cell between a handler's entry and exit
                pyro.poutine.runtime._PYRO_STACK.clear()
    return {"status": status, "detail": detail, "seconds": round(time.perf_counter() - start, 1)}


# --- results on disk, resumable ------------------------------------------------------------------


def load(results: Path, name: str) -> dict[str, Any]:
    path = results / f"{name}.json"
    return dict(json.loads(path.read_text())) if path.exists() else {}


def save(results: Path, name: str, cells: dict[str, Any]) -> None:
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cells, indent=1, sort_keys=True))
    tmp.replace(path)


def child(args: argparse.Namespace) -> int:
    """Run the requested cells of the requested models in this process, saving after each."""
    import torch

    torch.set_num_threads(1)
    torch.set_default_dtype(getattr(torch, args.dtype))
    import pyro

    pyro.enable_validation(True)
    results = Path(args.results)
    for name in args.models.split(","):
        for entry_point in args.entry_points.split(","):
            cells = load(results, name)
            if entry_point in cells:
                continue
            cells[entry_point] = {"status": "running"}
            save(results, name, cells)
            budget = args.compile_budget if entry_point == "compiled" else args.budget
            cells[entry_point] = run_cell(name, entry_point, budget)
            save(results, name, cells)
            print(
                f"{name} {entry_point}: {cells[entry_point]['status']} ({cells[entry_point]['seconds']} s)", flush=True
            )
    return 0


def run_phase(names: list[str], entry_points: list[str], args: argparse.Namespace) -> None:
    """Children until every cell has a result; a child killed mid-cell leaves ``running``, recorded as
    ``not run`` (time)."""
    results = Path(args.results)

    def todo() -> list[str]:
        pending = []
        for name in names:
            cells = load(results, name)
            for entry_point in entry_points:
                if cells.get(entry_point, {}).get("status") == "running":
                    cells[entry_point] = {"status": "not run", "detail": "time: the process was stopped"}
                    save(results, name, cells)
            if any(entry_point not in cells for entry_point in entry_points):
                pending.append(name)
        return pending

    while pending := todo():
        budget = args.compile_budget if "compiled" in entry_points else args.budget
        # a compile can run past the budget inside inductor, where the alarm cannot stop it: one model
        # per child, whose process group is killed past the budget
        batch = pending[:1] if "compiled" in entry_points else pending
        command = [sys.executable, __file__, "--child", "--models", ",".join(batch),
                   "--entry-points", ",".join(entry_points), "--results", args.results, "--dtype", args.dtype,
                   "--budget", str(args.budget), "--compile-budget", str(args.compile_budget)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        limit = len(batch) * len(entry_points) * (budget + 30) + 60
        process = subprocess.Popen(command, env=env, start_new_session=True)
        try:
            process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def forget(names: list[str], entry_points: list[str], results: Path) -> None:
    """Drop the recorded cells that ``--redo`` runs again."""
    for name in names:
        cells = load(results, name)
        dropped = [cells.pop(entry_point) for entry_point in entry_points if entry_point in cells]
        if dropped:
            save(results, name, cells)


# --- the table -------------------------------------------------------------------------------------


def table(names: list[str], results: Path) -> tuple[str, int, int]:
    from pyro_examples_models import EXAMPLES

    lines = ["| model | Pyro's loss | " + " | ".join(ENTRY_POINTS) + " |", "|---|---|" + "---|" * len(ENTRY_POINTS)]
    notes: list[str] = []
    not_ok = total = 0
    for name in names:
        cells = load(results, name)
        row = []
        for entry_point in ENTRY_POINTS:
            cell = cells.get(entry_point)
            if cell is None:
                row.append("not run")
                not_ok += 1
            else:
                status = cell["status"]
                row.append(status if status in ("ok", "n/a") else f"{status} [{len(notes) + 1}]")
                if status not in ("ok", "n/a"):
                    notes.append(f"{name} / {entry_point}: {cell.get('detail', '')}")
                    not_ok += 1
            total += 1
        example = EXAMPLES[name]()
        lines.append(f"| {name} | {example.pyro_loss_name} | " + " | ".join(row) + " |")
    lines += ["", *[f"{i}. {note}" for i, note in enumerate(notes, 1)]]
    return "\n".join(lines), not_ok, total


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    from pyro_examples_models import EXAMPLES

    names = list(EXAMPLES) if args.models == "all" else args.models.split(",")
    chosen = list(ENTRY_POINTS) if args.entry_points == "all" else args.entry_points.split(",")
    unknown = [n for n in names if n not in EXAMPLES] + [e for e in chosen if e not in ENTRY_POINTS]
    if unknown:
        print(f"unknown models or entry points {unknown}; models: {list(EXAMPLES)}", file=sys.stderr)
        return 2
    if args.table is None or args.models != "all" or args.entry_points != "all":
        if args.redo:  # only the cells of the phases that run again
            phased = {e for phase in args.phases.split(",") for e in PHASES[phase]}
            forget(names, [e for e in chosen if e in phased], Path(args.results))
        for phase in args.phases.split(","):
            entry_points = [e for e in PHASES[phase] if e in chosen]
            if entry_points:
                run_phase(names, entry_points, args)
    text, not_ok, total = table(list(EXAMPLES) if args.table else names, Path(args.results))
    import torch

    counts: dict[str, int] = {}
    for name in list(EXAMPLES) if args.table else names:
        cells = load(Path(args.results), name)
        for entry_point in ENTRY_POINTS:
            status = cells.get(entry_point, {}).get("status", "not run")
            counts[status] = counts.get(status, 0) + 1
    header = (
        f"python benchmarks/pyro_examples.py {' '.join(argv if argv is not None else sys.argv[1:])}\n"
        f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, pyro {pyro_version()}, "
        f"{args.dtype}, one thread\n"
        f"{not_ok} of {total} cells not ok: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + "\n"
    )
    print(header)
    print(text)
    if args.table:
        write_table(Path(args.table), header, text)
    return 0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def pyro_version() -> str:
    import pyro

    return str(pyro.__version__)


BEGIN, END = "<!-- table: benchmarks/pyro_examples.py --table -->", "<!-- end of table -->"


def write_table(path: Path, header: str, table_text: str) -> None:
    """Write the command line, machine and table to ``path``, or between the markers :data:`BEGIN` and
    :data:`END` of a page that has them (the rest of the page is kept)."""
    block = f"```\n{header.strip()}\n```\n\n{table_text.strip()}\n"
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        path.write_text(f"{head}{BEGIN}\n\n{block}\n{END}{rest.split(END, 1)[1]}")
    else:
        path.write_text(block)


if __name__ == "__main__":
    sys.exit(main())
