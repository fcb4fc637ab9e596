"""Seconds per SVI step: pyro_elbo's compiled step against Pyro, NumPyro and hand-written PyTorch.

Everything is measured side by side in this one process, on one CPU thread: the median step
latency of each block, blocks interleaved across methods, median over blocks (the machine is shared
and noisy: read the ratios, not the absolute times).

    python benchmarks/speed.py               # all tables
    python benchmarks/speed.py --quick       # fewer steps (a smoke run)

(a) eight schools (mean-field AutoNormal, 1 particle) and Bayesian logistic regression
    (N=5000, D=20, AutoNormal, 1 particle), Adam: pyro_elbo fit(compile=True) vs Pyro Trace_ELBO
    and JitTrace_ELBO (validation off) vs NumPyro's jitted svi.update (if numpyro is installed:
    `pip install -e .[bench]`).
(b) VAE on digits, batch 128, K in {1, 16}: fit(compile=True) with IWAE/DReG vs the same step
    hand-written in eager PyTorch and hand-written + torch.compile.
(c) compile time of (a), cold (empty inductor cache) and warm, each in a fresh process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pyro
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE))

import eight_schools  # noqa: E402
import logistic_regression  # noqa: E402

import pyro_elbo  # noqa: E402


def median_step(step: Callable[[], object], n: int) -> float:
    """Median wall-clock seconds of ``n`` calls (the same statistic as fit's ``step_seconds``)."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(runners: dict[str, Callable[[int], float]], steps: int, repeats: int) -> dict[str, float]:
    """Per runner: the median over interleaved blocks of each block's median seconds per step."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            times[name].append(run(steps))
    return {name: statistics.median(values) for name, values in times.items()}


def pyro_runner(model, guide_cls, args, jit: bool) -> Callable[[int], float]:
    pyro.clear_param_store()
    guide = guide_cls(model)
    loss = pyro.infer.JitTrace_ELBO(ignore_jit_warnings=True) if jit else pyro.infer.Trace_ELBO()
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), loss=loss)
    with pyro.validation_enabled(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        svi.step(*args)

    def run(n: int) -> float:
        with pyro.validation_enabled(False), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return median_step(lambda: svi.step(*args), n)

    return run


def pyro_elbo_runner(model, guide, args, objective, compile: bool) -> Callable[[int], float]:
    """fit(compile=...) resumed block after block from its own parameters (one fit call per block;
    the compiled graph is kept across calls by reusing the CompiledLoss)."""
    from pyro_elbo import train

    cache: dict[str, object] = {}
    original = train.CompiledLoss

    def cached(*a, **k):
        if "graph" not in cache:
            cache["graph"] = original(*a, **k)
        return cache["graph"]

    def run(n: int) -> float:
        train.CompiledLoss = cached
        try:
            with pyro.validation_enabled(False):
                result = pyro_elbo.fit(model, guide, *args, objective=objective, num_steps=n, lr=0.01,
                                       compile=compile, progress=False)
        finally:
            train.CompiledLoss = original
        return statistics.median(result.step_seconds)

    run(3)  # create parameters, compile
    return run


def numpyro_runner(name: str) -> Callable[[int], float] | None:
    try:
        import jax
        import numpyro
        import numpyro.distributions as nd
        from numpyro.infer import SVI, Trace_ELBO
        from numpyro.infer.autoguide import AutoNormal
    except ImportError:
        return None
    jax.config.update("jax_platform_name", "cpu")
    import numpy as np

    if name == "eight schools":
        y, sigma, _ = eight_schools.load()
        y, sigma = np.asarray(y), np.asarray(sigma)

        def model(y, sigma):
            mu = numpyro.sample("mu", nd.Normal(0.0, 5.0))
            tau = numpyro.sample("tau", nd.HalfCauchy(5.0))
            with numpyro.plate("school", len(y)):
                theta_tilde = numpyro.sample("theta_tilde", nd.Normal(0.0, 1.0))
                numpyro.sample("obs", nd.Normal(mu + tau * theta_tilde, sigma), obs=y)

        args = (y, sigma)
    else:
        x, yy = logistic_regression.make_data()
        x, yy = np.asarray(x), np.asarray(yy)

        def model(x, y):
            w = numpyro.sample("w", nd.Normal(np.zeros(x.shape[1]), 1.0).to_event(1))
            b = numpyro.sample("b", nd.Normal(0.0, 1.0))
            with numpyro.plate("data", x.shape[0]):
                numpyro.sample("y", nd.Bernoulli(logits=x @ w + b), obs=y)

        args = (x, yy)
    svi = SVI(model, AutoNormal(model), numpyro.optim.Adam(0.01), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(0), *args)
    update = jax.jit(svi.update)
    state, loss = update(state, *args)
    loss.block_until_ready()
    holder = {"state": state}

    def run(n: int) -> float:
        def one() -> None:
            holder["state"], loss = update(holder["state"], *args)
            loss.block_until_ready()

        return median_step(one, n)

    return run


def table_a(steps: int, repeats: int) -> list[str]:
    from pyro.infer.autoguide import AutoNormal

    y, sigma, _ = eight_schools.load()
    x, labels = logistic_regression.make_data()
    problems = [
        ("eight schools", eight_schools.noncentered_model, (y, sigma)),
        ("logistic regression", logistic_regression.model, (x, labels)),
    ]
    lines = ["| model | Pyro Trace_ELBO | Pyro JitTrace_ELBO | NumPyro jit | pyro_elbo eager fit | pyro_elbo compiled | "
             "compiled vs Trace_ELBO | compiled vs NumPyro |", "|---|---|---|---|---|---|---|---|"]
    for name, model, args in problems:
        runners: dict[str, Callable[[int], float]] = {
            "trace": pyro_runner(model, AutoNormal, args, jit=False),
            "jit": pyro_runner(model, AutoNormal, args, jit=True),
        }
        numpyro_run = numpyro_runner(name)
        if numpyro_run is not None:
            runners["numpyro"] = numpyro_run
        pyro.clear_param_store()
        guide = AutoNormal(model)
        runners["eager"] = pyro_elbo_runner(model, guide, args, pyro_elbo.ELBO(), compile=False)
        runners["compiled"] = pyro_elbo_runner(model, guide, args, pyro_elbo.ELBO(), compile=True)
        t = interleaved(runners, steps, repeats)
        us = {k: f"{1e6 * v:,.0f} µs" for k, v in t.items()}
        vs_numpyro = f"{t['compiled'] / t['numpyro']:.2f}×" if "numpyro" in t else "not installed"
        lines.append(
            f"| {name} | {us['trace']} | {us['jit']} | {us.get('numpyro', 'not installed')} | {us['eager']} | "
            f"{us['compiled']} | {t['trace'] / t['compiled']:.0f}× faster | {vs_numpyro} |"
        )
    return lines


def table_b(steps: int, repeats: int) -> list[str]:
    import objectives_vae as bench
    import vae_digits as vae

    images = vae.load_digits()
    x = images[:128]
    params = list(vae.encoder.parameters()) + list(vae.decoder.parameters())
    lines = ["| objective | K | hand-written eager | hand-written torch.compile | pyro_elbo compiled | "
             "vs eager | vs torch.compile |", "|---|---|---|---|---|---|---|"]
    for name in ("iwae", "dreg"):
        for k in (1, 16):
            def loss(xb, name=name, k=k):
                return bench.handwritten_loss(name, xb, k)

            eager_step = bench.make_step(loss, params)
            compiled_loss = torch.compile(loss)
            compiled_step = bench.make_step(compiled_loss, params)
            for _ in range(3):  # warm up (torch.compile may recompile once after the first step)
                eager_step(x)
                compiled_step(x)
            pyro.clear_param_store()
            runners = {
                "eager": lambda n, s=eager_step: median_step(lambda: s(x), n),
                "torch.compile": lambda n, s=compiled_step: median_step(lambda: s(x), n),
                "ours": pyro_elbo_runner(vae.model, vae.guide, (x,), pyro_elbo.make_objective(name, num_particles=k),
                                         compile=True),
            }
            t = interleaved(runners, steps, repeats)
            lines.append(
                f"| {name} | {k} | {1e3 * t['eager']:.2f} ms | {1e3 * t['torch.compile']:.2f} ms | "
                f"{1e3 * t['ours']:.2f} ms | {t['ours'] / t['eager']:.2f}× | {t['ours'] / t['torch.compile']:.2f}× |"
            )
    return lines


COMPILE_CHILD = """
import sys, time, torch, pyro
sys.path.insert(0, {examples!r})
torch.set_num_threads(1)
import pyro_elbo, eight_schools, logistic_regression
from pyro.infer.autoguide import AutoNormal
for name, model, args in [("eight schools", eight_schools.noncentered_model, eight_schools.data()),
                          ("logistic regression", logistic_regression.model, logistic_regression.data())]:
    pyro.clear_param_store()
    r = pyro_elbo.fit(model, AutoNormal(model), *args, num_steps=2, compile=True, progress=False)
    print(name, r.compile_seconds)
"""


def table_c() -> list[str]:
    code = COMPILE_CHILD.format(examples=str(HERE.parent / "examples"))
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        runs = []
        for _ in ("cold", "warm"):
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
            runs.append(dict(line.rsplit(" ", 1) for line in out.stdout.strip().splitlines()))
    lines = ["| model | compile, cold cache | compile, warm cache |", "|---|---|---|"]
    for name in runs[0]:
        lines.append(f"| {name} | {float(runs[0][name]):.1f} s | {float(runs[1][name]):.1f} s |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tables", default="abc")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps, repeats = (20, 2) if args.quick else (200, 3)
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, {args.threads} thread(s), "
          f"medians of {repeats} interleaved blocks of {steps} steps")
    if "a" in args.tables:
        print("\n(a) seconds per step, one particle, Adam\n")
        print("\n".join(table_a(steps, repeats)))
    if "b" in args.tables:
        print("\n(b) VAE on digits, batch 128, seconds per step\n")
        print("\n".join(table_b(max(5, steps // 10), repeats)))
    if "c" in args.tables:
        print("\n(c) compile time (capture + inductor), fresh process each\n")
        print("\n".join(table_c()))


if __name__ == "__main__":
    main()
