"""Wall time until a run has taken N steps, for ``fit(compile=False)``, ``compile=True`` and
``compile="auto"``: what a user waits for, compile included.

Each configuration runs in a fresh process (imports excluded from the clock: it starts when
``fit`` is called) with its own empty inductor cache (``--warm`` keeps one cache per model and
runs each configuration once before the timed run, so the compile reads it). ``compile=False``
and ``compile=True`` take the largest N once and read the time of every smaller N from the same
run; ``compile="auto"`` decides from the run's length, so it runs once per N.

    python benchmarks/time_to_steps.py                       # eight schools, N = 50, 200, 1000, 5000
    python benchmarks/time_to_steps.py --steps 50,200 --warm
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = """
import json, sys, time, warnings
sys.path.insert(0, {examples!r})
import pyro, torch
from pyro.infer.autoguide import AutoNormal
import pyro_elbo
import eight_schools
torch.set_num_threads(1)
model = eight_schools.noncentered_model
y, sigma = eight_schools.data()
compile_ = {compile!r}
stamps = []
pyro.clear_param_store()
warnings.simplefilter("ignore")
start = time.perf_counter()
result = pyro_elbo.fit(model, AutoNormal(model), y, sigma, num_steps={steps}, seed=0, compile=compile_, progress=False,
                       callbacks=[lambda step, loss: stamps.append(time.perf_counter() - start) or True])
total = time.perf_counter() - start
print(json.dumps({{"stamps": stamps, "total": total, "decision": result.compile_decision,
                  "compile_seconds": result.compile_seconds}}))
"""


def run(compile_: bool | str, steps: int, cache: str) -> dict[str, object]:
    code = CHILD.format(examples=str(HERE.parent / "examples"), compile=compile_, steps=steps)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"compile={compile_!r}, {steps} steps failed:\n{out.stderr}")
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", default="50,200,1000,5000")
    parser.add_argument("--warm", action="store_true", help="a warm inductor cache (one run first)")
    args = parser.parse_args(argv)
    ns = [int(n) for n in args.steps.split(",")]
    rows: dict[str, list[float]] = {}
    notes = []
    with tempfile.TemporaryDirectory(prefix="pyro_elbo_time_to_steps_") as root:
        for compile_ in (False, True, "auto"):
            times = []
            for n in [max(ns)] if compile_ != "auto" else ns:
                cache = root if args.warm else tempfile.mkdtemp(dir=root)
                if args.warm:
                    run(compile_, n, cache)
                result = run(compile_, n, cache)
                stamps = result["stamps"]
                assert isinstance(stamps, list)
                if compile_ == "auto":
                    times.append(stamps[n - 1])
                    notes.append(f"auto, N={n}: {result['decision']}")
                else:
                    times = [stamps[k - 1] for k in ns]
            rows[repr(compile_)] = times
    print(f"eight schools (AutoNormal, Adam), wall seconds to N steps, {'warm' if args.warm else 'cold'} cache")
    print("| compile | " + " | ".join(f"N={n}" for n in ns) + " |")
    print("|---|" + "---|" * len(ns))
    for name, times in rows.items():
        print(f"| {name} | " + " | ".join(f"{t:.2f}" for t in times) + " |")
    for note in notes:
        print(note)
    print(f"(measured {time.strftime('%Y-%m-%d')})")


if __name__ == "__main__":
    main()
