"""Speed on real Pyro models (the zoo in ``tests/pyro_models.py``), side by side in one run.

For each model: median µs per step of ``pyro_elbo.fit(compile=False)`` (eager), of
``fit(compile=True)`` (the compiled step, first step excluded) and of Pyro's own ``SVI`` step with
``Trace_ELBO`` (``TraceEnum_ELBO`` for enumerated models); the ratios; the cold compile seconds
(``FitResult.compile_seconds`` in a fresh process, with no entry for the model in the inductor cache)
and the warm compile seconds (a second fresh process, same model and shapes, same cache folder), each
with inductor's share and its FX graph cache's answer (hit/miss); and which path ran, with the
fallback warning's text.

Both compiles run in child processes, as a user's first and second run would: a compile in the
process that already compiled another model would skip importing inductor, its CPU check and its
hash of torch's sources (~2 s). The cache folder is shared by the models of one run, so the first
model's cold compile also builds inductor's vector-ISA probe (once per cache folder; a few seconds).

    python benchmarks/real_models.py                          # every model, 200 steps, 1 thread
    python benchmarks/real_models.py --models vae,dmm --steps 500 --threads 2
    python benchmarks/real_models.py --no-compile             # eager and Pyro only (fast)

The inductor cache lives in a fresh temporary folder for each run (``--cache-dir`` to reuse one),
so "cold" means cold. Prints a Markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="all", help="comma-separated zoo names (default: all)")
    parser.add_argument("--steps", type=int, default=200, help="steps per timed run (default: 200)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled runs")
    parser.add_argument("--no-warm", action="store_true", help="skip the second-process (warm cache) compile")
    parser.add_argument("--cache-dir", default=None, help="inductor cache folder (default: a fresh temporary one)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--child-compile", default=None, help=argparse.SUPPRESS)  # compile child process
    return parser.parse_args(argv)


def _setup(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.set_default_dtype(getattr(torch, args.dtype))


def _median_us(seconds: list[float]) -> float:
    return 1e6 * statistics.median(seconds[1:] if len(seconds) > 1 else seconds)


def fit_timing(name: str, steps: int, compile: bool) -> dict[str, Any]:
    """Median µs/step of ``pyro_elbo.fit``, the compile seconds and any fallback warning."""
    import pyro
    from pyro_models import ZOO

    import pyro_elbo

    pyro.clear_param_store()
    entry = ZOO[name]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = pyro_elbo.fit(
                entry.model,
                entry.guide,
                *entry.args,
                num_steps=steps,
                lr=0.01,
                seed=0,
                progress=False,
                compile=compile,
                **entry.kwargs,
            )
        except Exception as error:  # a model fit cannot train at all (e.g. enumerated sites): a row, not a crash
            return {
                "us": None,
                "compile_s": None,
                "fallback": None,
                "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}",
            }
    fallback = [str(w.message) for w in caught if "falling back" in str(w.message)]
    stats = result.compile_stats if compile else None
    return {
        "us": _median_us(result.step_seconds),
        "compile_s": result.compile_seconds,
        "inductor_s": stats.seconds if stats and stats.cache else None,  # the rest: trace and eager checks
        # "torch.compile": inductor's compile_fx failed (why: "compile_fallback"), no on-disk caches
        "cache": (stats.cache or ("torch.compile" if stats.fallback else "")) if stats else None,
        "compile_fallback": stats.fallback if stats else None,
        "fallback": fallback[0] if fallback else None,
    }


def pyro_timing(name: str, steps: int) -> float:
    """Median µs per ``SVI.step`` with Pyro's own estimator and Adam."""
    import pyro
    from pyro_models import ZOO

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    entry = ZOO[name]()
    svi = pyro.infer.SVI(entry.model, entry.guide, pyro.optim.Adam({"lr": 0.01}), loss=entry.pyro_loss())  # type: ignore[attr-defined]
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        svi.step(*entry.args, **entry.kwargs)
        seconds.append(time.perf_counter() - start)
    return _median_us(seconds)


def child_fit(name: str, steps: int, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any] | None:
    """:func:`fit_timing` with ``compile=True`` in a fresh process with the same inductor cache
    folder (``TORCHINDUCTOR_CACHE_DIR`` in ``env``): the compile seconds (and inductor's share, and
    its cache's answer) a user's new process would see."""
    cache = env["TORCHINDUCTOR_CACHE_DIR"]  # passed on explicitly: the child must not make a fresh one
    command = [
        sys.executable,
        __file__,
        "--child-compile",
        name,
        "--steps",
        str(steps),
        "--threads",
        str(args.threads),
        "--dtype",
        args.dtype,
        "--cache-dir",
        cache,
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        print(f"  compile child failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def measure(name: str, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name}
    row["pyro_us"] = pyro_timing(name, args.steps)
    eager = fit_timing(name, args.steps, compile=False)
    row["eager_us"] = eager["us"]
    if eager.get("error"):
        row["path"] = f"fit fails: {eager['error']}"
    elif not args.no_compile:
        start = time.perf_counter()
        compiled = child_fit(name, args.steps, args, env)
        row["compiled_run_s"] = time.perf_counter() - start
        if compiled is None:
            row["path"] = "compile child failed (its last stderr line is printed above)"
            return row
        row["compiled_us"] = compiled["us"]
        row["cold_compile_s"] = compiled["compile_s"]
        row["cold_inductor_s"], row["cold_cache"] = compiled.get("inductor_s"), compiled.get("cache")
        row["fallback"] = compiled["fallback"]
        if compiled.get("error"):
            row["path"] = f"fit(compile=True) fails: {compiled['error']}"
        else:
            row["path"] = "eager fallback" if compiled["fallback"] else "compiled"
        if not args.no_warm and row["path"] == "compiled":
            warm = child_fit(name, 2, args, env) or {}
            row["warm_compile_s"], row["warm_inductor_s"] = warm.get("compile_s"), warm.get("inductor_s")
            row["warm_cache"] = warm.get("cache")
    return row


def _fmt(value: Any, spec: str = ".0f") -> str:
    return "—" if value is None else format(value, spec)


def _compile_cell(row: dict[str, Any], which: str) -> str:
    total = row.get(f"{which}_compile_s")
    if total is None:
        return "—"
    return f"{total:.1f} ({_fmt(row.get(f'{which}_inductor_s'), '.1f')}, {row.get(f'{which}_cache') or '—'})"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | Pyro µs/step | eager µs/step | compiled µs/step | Pyro/eager | Pyro/compiled "
        "| cold compile s (inductor, cache) | warm compile s (inductor, cache) | path |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        compiled = r.get("compiled_us")
        lines.append(
            f"| {r['model']} | {_fmt(r['pyro_us'])} | {_fmt(r['eager_us'])} | {_fmt(compiled)} "
            f"| {_fmt(r['pyro_us'] / r['eager_us'] if r['eager_us'] else None, '.2f')}{'×' if r['eager_us'] else ''} "
            f"| {_fmt(r['pyro_us'] / compiled if compiled else None, '.2f')}{'×' if compiled else ''} "
            f"| {_compile_cell(r, 'cold')} | {_compile_cell(r, 'warm')} "
            f"| {r.get('path', 'not run')} |"
        )
    fallbacks = [f"- {r['model']}: {r['fallback']}" for r in rows if r.get("fallback")]
    if fallbacks:
        lines += ["", "Fallback warnings (first line):"] + [f.splitlines()[0][:400] for f in fallbacks]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cache = args.cache_dir or tempfile.mkdtemp(prefix="pyro_elbo_inductor_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # before torch is imported: a cold cache
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    _setup(args)
    if args.child_compile:
        print(json.dumps(fit_timing(args.child_compile, args.steps, compile=True)))
        return 0
    import torch
    from pyro_models import ZOO

    names = list(ZOO) if args.models == "all" else args.models.split(",")
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        print(f"unknown models {unknown}; choose from {list(ZOO)}", file=sys.stderr)
        return 2
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.dtype}, {args.steps} steps, "
        f"inductor cache {cache}, load average {load}",
        flush=True,
    )
    rows = []
    for name in names:
        start = time.perf_counter()
        rows.append(measure(name, args, env))
        print(f"{name}: {json.dumps(rows[-1])} ({time.perf_counter() - start:.0f} s)", flush=True)
    print()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
