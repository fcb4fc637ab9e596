"""Wall time until a run has taken N steps, for ``fit(compile=False)``, ``compile=True`` and
``compile="auto"``: what a user waits for, compile included.

Models (``tests/pyro_models.py``'s zoo): eight schools (non-centered, ``AutoNormal``), the VAE
(digits, ``pyro.module`` encoder and decoder, batch 128) and the HMM with its hidden states
enumerated (``AutoNormal`` on the emission and transition probabilities); Adam, one particle,
``ELBO``, one torch thread.

Each configuration runs in a fresh process (imports excluded from the clock: it starts when
``fit`` is called) with its own empty inductor cache (``--warm`` keeps one cache per model and
runs each configuration once before the timed run, so the compile reads it). ``compile=False``
and ``compile=True`` take the largest N once and read the time of every smaller N from the same
run; ``compile="auto"`` decides from the run's length, so it runs once per N. The load average
is printed beside each run: on a machine busy with other work every number is inflated, and
``compile="auto"`` chooses differently (it forks its background compile only when a core stood
idle beside the run).

The full table (three models, N = 50, 200, 1000, 5000, the three modes, cold cache), in one
command; run it on an otherwise idle machine (about 10-20 minutes on 2 cores)::

    python benchmarks/time_to_steps.py

Smaller runs::

    python benchmarks/time_to_steps.py --models eight_schools --steps 200,1000
    python benchmarks/time_to_steps.py --modes auto --warm

Prints a Markdown table (seconds from the call of ``fit`` to step N), then each ``"auto"`` run's
``FitResult.compile_decision``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: the models measured, by zoo name, and how the table names them
MODELS = {"eight_schools": "eight schools", "vae": "VAE", "hmm_enum": "enumerated HMM"}
MODES = {"False": False, "True": True, "auto": "auto"}

CHILD = """
import json, os, sys, time, warnings
sys.path.insert(0, {tests!r})
import pyro, torch
import pyro_elbo
from pyro_models import ZOO
torch.set_num_threads({threads})
entry = ZOO[{model!r}]()
stamps = []
pyro.clear_param_store()
warnings.simplefilter("ignore")
load = os.getloadavg()[0]
start = time.perf_counter()
result = pyro_elbo.fit(entry.model, entry.guide, *entry.args, num_steps={steps}, lr=0.01, seed=0,
                       compile={compile!r}, progress=False,
                       callbacks=[lambda step, loss: stamps.append(time.perf_counter() - start) or True])
total = time.perf_counter() - start
print(json.dumps({{"stamps": stamps, "total": total, "decision": result.compile_decision,
                  "compile_seconds": result.compile_seconds, "load": [load, os.getloadavg()[0]]}}))
"""


def run(model: str, compile_: bool | str, steps: int, cache: str, threads: int) -> dict[str, object]:
    """One ``fit`` in a fresh process; its step time stamps, decision and load averages."""
    code = CHILD.format(tests=str(ROOT / "tests"), model=model, compile=compile_, steps=steps, threads=threads)
    return run_child(code, cache, threads)


def run_child(code: str, cache: str, threads: int) -> dict[str, object]:
    """Run ``code`` in a fresh Python process with inductor's cache in ``cache``, ``threads``
    OpenMP threads and this checkout first on the path; the JSON object its last line prints, or
    ``{"error": ...}`` with the last line of its stderr."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "OMP_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit status {out.returncode}"}
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--steps", default="50,200,1000,5000", help="comma-separated N (default: 50,200,1000,5000)")
    parser.add_argument("--modes", default="False,True,auto", help="comma-separated compile= values")
    parser.add_argument("--warm", action="store_true", help="a warm inductor cache (one untimed run first)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = parser.parse_args(argv)
    ns = sorted(int(n) for n in args.steps.split(","))
    models = args.models.split(",")
    modes = args.modes.split(",")
    unknown = [m for m in models if m not in MODELS] + [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown model or mode: {', '.join(unknown)}")
    rows: list[str] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="pyro_elbo_time_to_steps_") as root:
        for model in models:
            warm_cache = tempfile.mkdtemp(dir=root)
            for mode in modes:
                compile_ = MODES[mode]
                cells, loads = [], []
                for n in [ns[-1]] if compile_ != "auto" else ns:
                    cache = warm_cache if args.warm else tempfile.mkdtemp(dir=root)
                    if args.warm:
                        run(model, compile_, n, cache, args.threads)
                    result = run(model, compile_, n, cache, args.threads)
                    if "error" in result:
                        cells = [f"failed: {result['error']}"] * len(ns)
                        break
                    stamps, load = result["stamps"], result["load"]
                    assert isinstance(stamps, list) and isinstance(load, list)
                    loads.append(f"{load[0]:.1f}-{load[1]:.1f}")
                    if compile_ == "auto":
                        cells.append(f"{stamps[n - 1]:.2f}")
                        notes.append(f"- {MODELS[model]}, auto, N={n}: {result['decision']}")
                    else:
                        cells = [f"{stamps[k - 1]:.2f}" for k in ns]
                    print(
                        f"{MODELS[model]}, compile={mode}, N={n}: {stamps[n - 1]:.2f} s (load {loads[-1]})", flush=True
                    )
                rows.append(f"| {MODELS[model]} | `{mode}` | " + " | ".join(cells) + f" | {', '.join(loads)} |")
    import torch

    print()
    print(
        f"Seconds from the call of `fit` to step N, {'warm' if args.warm else 'cold'} inductor cache, "
        f"{args.threads} thread(s); torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d')}"
    )
    print()
    print("| model | compile | " + " | ".join(f"N={n}" for n in ns) + " | load average (start-end of each run) |")
    print("|---|---|" + "---|" * len(ns) + "---|")
    print("\n".join(rows))
    if notes:
        print()
        print("\n".join(notes))


if __name__ == "__main__":
    main()
