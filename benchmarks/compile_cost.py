"""What a cold compile of the training step costs, beside the number of operators one eager step
dispatches: the data behind ``compile="auto"``'s expected compile
(:func:`pyro_elbo.train.autocompile.expected_compile_seconds`, :math:`a + b\\,n` seconds for
:math:`n` operators).

For each model, in a fresh process with an empty inductor cache and one torch thread: one eager
``fit`` whose second step runs under
:func:`pyro_elbo.compile.torch_internals.counting_operators` (as ``compile="auto"``'s probe does),
then ``fit(compile=True)`` for two steps, whose ``FitResult.compile_seconds`` is the capture and
the cold compile. Prints a Markdown table (operators, compile seconds, the package's expectation
and their ratio, the load average), then the least-squares line through the rows. Compile times
grow with the machine's load: run it on an otherwise idle machine.

    python benchmarks/compile_cost.py                       # the model zoo (tests/pyro_models.py)
    python benchmarks/compile_cost.py --examples scanvi,cevae,mixed_hmm   # and some of Pyro's examples
    python benchmarks/compile_cost.py --models vae,hmm_enum
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from time_to_steps import run_child  # a sibling script: runs one child process with an empty cache

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import contextlib, json, os, sys, warnings
sys.path.insert(0, {tests!r})
import pyro, torch
import pyro_elbo
from pyro_elbo.compile.torch_internals import counting_operators
from pyro_elbo.train.hooks import Hook
torch.set_num_threads(1)
warnings.simplefilter("ignore")
if {example!r}:
    from pyro_examples_models import EXAMPLES as MODELS
else:
    from pyro_models import ZOO as MODELS

class CountSecondStep(Hook):
    def __init__(self):
        self.stack, self.count = contextlib.ExitStack(), None
    def on_step(self, state, info):
        if info.step == 1:
            self.counted = self.stack.enter_context(counting_operators())
        elif info.step == 2:
            self.stack.close()
            self.count = self.counted.count
        return None

entry = MODELS[{model!r}]()
pyro.clear_param_store()
hook = CountSecondStep()
pyro_elbo.fit(entry.model, entry.guide, *entry.args, num_steps=3, lr=0.01, seed=0, compile=False,
              progress=False, hooks=[hook], **entry.kwargs)
load = os.getloadavg()[0]
entry = MODELS[{model!r}]()
pyro.clear_param_store()
result = pyro_elbo.fit(entry.model, entry.guide, *entry.args, num_steps=2, lr=0.01, seed=0, compile=True,
                       progress=False, **entry.kwargs)
stats = result.compile_stats
print(json.dumps({{"operators": hook.count, "seconds": result.compile_seconds, "load": [load, os.getloadavg()[0]],
                  "cache": stats.cache if stats is not None else None}}))
"""


def measure(model: str, example: bool) -> dict[str, object]:
    """One model's operator count and cold compile, in a fresh process with an empty cache."""
    code = CHILD.format(tests=str(ROOT / "tests"), model=model, example=example)
    with tempfile.TemporaryDirectory() as cache:
        return run_child(code, cache, threads=1)


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from pyro_models import ZOO

    from pyro_elbo.train.autocompile import expected_compile_seconds

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(ZOO), help="zoo models (tests/pyro_models.py), comma-separated")
    parser.add_argument("--examples", default="", help="Pyro examples (tests/pyro_examples_models.py), comma-separated")
    args = parser.parse_args(argv)
    runs = [(m, False) for m in args.models.split(",") if m] + [(m, True) for m in args.examples.split(",") if m]
    print("| model | operators | cold compile (s) | expected (s) | ratio | load average |")
    print("|---|---|---|---|---|---|")
    points = []
    for model, example in runs:
        row = measure(model, example)
        name = f"{model} (Pyro example)" if example else model
        if "error" in row or row.get("seconds") is None or row.get("operators") is None:
            print(f"| {name} | — | — | — | — | {row.get('error', 'not compiled (fell back to eager)')} |", flush=True)
            continue
        operators, seconds = int(row["operators"]), float(row["seconds"])  # type: ignore[call-overload, arg-type]
        expected = expected_compile_seconds(operators)
        load = "–".join(f"{v:.1f}" for v in row["load"])  # type: ignore[attr-defined]
        print(
            f"| {name} | {operators} | {seconds:.1f} | {expected:.1f} | {seconds / expected:.2f} | {load} |", flush=True
        )
        points.append((operators, seconds))
    if len(points) >= 2:
        n = len(points)
        mean_x, mean_y = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
        sxx = sum((x - mean_x) ** 2 for x, _ in points)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx if sxx > 0 else 0.0
        intercept = mean_y - slope * mean_x
        spread = (sum((y - intercept - slope * x) ** 2 for x, y in points) / max(n - 2, 1)) ** 0.5
        print(
            f"\nleast squares over {n} models: {intercept:.2f} s + {1e3 * slope:.2f} ms per operator "
            f"(residual standard deviation {spread:.1f} s)"
        )


if __name__ == "__main__":
    main()
