"""Seconds per SVI step: pyro_elbo's compiled step against Pyro, NumPyro and hand-written PyTorch.

Everything is measured side by side in this one process, on one CPU thread and one core (the
process is pinned to ``--threads`` cores, so that JAX's extra threads share them): the median step
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
import functools
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


def _no_sync() -> None:
    """CPU: nothing to wait for."""


#: set by --device cuda: wait for the GPU before reading the clock
SYNC: Callable[[], None] = _no_sync


def median_step(step: Callable[[], object], n: int) -> float:
    """Median wall-clock seconds of ``n`` calls (the same statistic as fit's ``step_seconds``)."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        SYNC()
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


def pyro_elbo_runner(model, guide, args, objective, compile: bool, device: str | None = None) -> Callable[[int], float]:
    """The public ``init``/``step`` loop (what ``fit`` runs, without its hooks): one state kept
    across blocks, so the compiled graph is built once (by the warm-up steps)."""
    from pyro_elbo.train import init, step

    with pyro.validation_enabled(False):
        state = init(model, guide, *args, objective=objective, lr=0.01, compile=compile, device=device)
        for _ in range(3):  # create parameters, capture and compile
            state, _ = step(state)

    def run(n: int) -> float:
        with pyro.validation_enabled(False):
            return median_step(lambda: step(state), n)

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


def table_a(steps: int, repeats: int, device: str) -> list[str]:
    from pyro.infer.autoguide import AutoNormal

    y, sigma, _ = eight_schools.load()
    x, labels = logistic_regression.make_data()
    problems = [
        ("eight schools", eight_schools.noncentered_model, (y.to(device), sigma.to(device))),
        ("logistic regression", logistic_regression.model, (x.to(device), labels.to(device))),
    ]
    lines = [
        "| model | Pyro Trace_ELBO | Pyro JitTrace_ELBO | NumPyro jit (CPU) | pyro_elbo eager | pyro_elbo compiled | "
        "compiled vs Trace_ELBO (speed-up) | compiled / NumPyro (time ratio) |",
        "|---|---|---|---|---|---|---|---|",
    ]
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
        runners["eager"] = pyro_elbo_runner(model, guide, args, pyro_elbo.ELBO(), compile=False, device=device)
        runners["compiled"] = pyro_elbo_runner(model, guide, args, pyro_elbo.ELBO(), compile=True, device=device)
        t = interleaved(runners, steps, repeats)
        us = {k: f"{1e6 * v:,.0f} µs" for k, v in t.items()}
        vs_numpyro = f"{t['compiled'] / t['numpyro']:.2f}×" if "numpyro" in t else "skipped (no numpyro/jax)"
        lines.append(
            f"| {name} | {us['trace']} | {us['jit']} | {us.get('numpyro', 'skipped')} | {us['eager']} | "
            f"{us['compiled']} | {t['trace'] / t['compiled']:.1f}× faster | {vs_numpyro} |"
        )
    return lines


def table_b(
    steps: int, repeats: int, device: str, batch: int, ks: list[int], names: list[str], mode: str | None
) -> list[str]:
    """The VAE step against the same step written by hand (eager, and ``torch.compile`` with ``mode``)."""
    import objectives_vae as bench
    import vae_digits as vae

    vae.encoder.to(device)
    vae.decoder.to(device)
    images = vae.load_digits()
    x = images[torch.arange(batch) % len(images)].to(device)  # digits repeated up to the batch size
    params = list(vae.encoder.parameters()) + list(vae.decoder.parameters())
    compiled_name = f"torch.compile({mode or 'default'})"
    lines = [
        f"| objective | K | batch | hand-written eager | hand-written {compiled_name} | pyro_elbo compiled | "
        f"vs eager | vs {compiled_name} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        for k in ks:

            def loss(xb, name=name, k=k):
                return bench.handwritten_loss(name, xb, k)

            eager_step = bench.make_step(loss, params)
            compiled_loss = torch.compile(loss, mode=mode)
            compiled_step = bench.make_step(compiled_loss, params)
            for _ in range(3):  # warm up (torch.compile may recompile once after the first step)
                eager_step(x)
                compiled_step(x)
            pyro.clear_param_store()
            runners = {
                "eager": lambda n, s=eager_step: median_step(lambda: s(x), n),
                "torch.compile": lambda n, s=compiled_step: median_step(lambda: s(x), n),
                "ours": pyro_elbo_runner(
                    vae.model,
                    vae.guide,
                    (x,),
                    pyro_elbo.make_objective(name, num_particles=k),
                    compile=True,
                    device=device,
                ),
            }
            t = interleaved(runners, steps, repeats)
            lines.append(
                f"| {name} | {k} | {batch} | {1e3 * t['eager']:.2f} ms | {1e3 * t['torch.compile']:.2f} ms | "
                f"{1e3 * t['ours']:.2f} ms | {t['ours'] / t['eager']:.2f}× | {t['ours'] / t['torch.compile']:.2f}× |"
            )
    return lines


def largest_k(device: str, batch: int, start: int, cap: int) -> str:
    """The largest K (doubling from ``start``) whose eager IWAE step on the VAE runs on ``device``
    at ``batch`` (an out-of-memory error ends the search). The compiled step's peak memory is
    not measured here."""
    import vae_digits as vae

    images = vae.load_digits()
    x = images[torch.arange(batch) % len(images)].to(device)
    fits, k = None, start
    while k <= cap:
        try:
            pyro.clear_param_store()
            state = pyro_elbo.train.init(
                vae.model, vae.guide, x, objective=pyro_elbo.IWAE(num_particles=k), device=device
            )
            pyro_elbo.train.step(state)
            SYNC()
            fits = k
        except (torch.OutOfMemoryError, ValueError) as error:  # ValueError: init's memory check refused
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return f"largest K at batch {batch}: {fits} (K={k} failed: {type(error).__name__}: {str(error).splitlines()[0][:120]})"
        k *= 2
    return f"largest K at batch {batch}: {fits} (the search stops at --max-k {cap})"


COMPILE_CHILD = """
import sys, time, torch, pyro
sys.path.insert(0, {examples!r})
torch.set_num_threads(1)
import pyro_elbo, eight_schools, logistic_regression
from pyro.infer.autoguide import AutoNormal
models = {{"eight schools": (eight_schools.noncentered_model, eight_schools.data()),
          "logistic regression": (logistic_regression.model, logistic_regression.data())}}
name = sys.argv[1]
model, args = models[name]
r = pyro_elbo.fit(model, AutoNormal(model), *args, num_steps=2, compile=True, progress=False)
print(name, r.compile_seconds)
"""
COMPILE_MODELS = ("eight schools", "logistic regression")


def table_c() -> list[str]:
    """Each model compiled in its own fresh process, twice: an empty inductor cache, then the same
    cache (what a second run of a script pays; inductor's import is paid in both)."""
    code = COMPILE_CHILD.format(examples=str(HERE.parent / "examples"))
    lines = ["| model | compile, cold cache | compile, warm cache (second process) |", "|---|---|---|"]
    for name in COMPILE_MODELS:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            seconds = []
            for _ in ("cold", "warm"):
                run = subprocess.run(
                    [sys.executable, "-c", code, name], capture_output=True, text=True, env=env, check=True
                )
                seconds.append(float(run.stdout.strip().splitlines()[-1].rsplit(" ", 1)[1]))
        lines.append(f"| {name} | {seconds[0]:.1f} s | {seconds[1]:.1f} s |")
    return lines


def pin_cpus(count: int) -> set[int] | None:
    """Run this process (and the compile children of table c) on ``count`` cores: torch obeys its
    thread count, but JAX runs a dispatch thread and XLA's own thread pool beside the Python thread,
    so unpinned, NumPyro's "one thread" step used a second core when one was free (94 µs against
    156 µs pinned, eight schools, load ~1). Returns the cores, or ``None`` where affinity cannot be
    set."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    available = sorted(os.sched_getaffinity(0))
    cores = set(available[-count:])
    os.sched_setaffinity(0, cores)
    return cores


def main(argv: list[str] | None = None) -> None:
    global SYNC
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes and steps (tests the script, measures nothing)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--tables", default="abc", help="a: eight schools/logistic; b: VAE; c: compile time; k: largest K"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--vae-batch", type=int, default=128)
    parser.add_argument("--vae-k", default="1,16", help="comma-separated particle counts for (b)")
    parser.add_argument("--vae-objectives", default="iwae,dreg")
    parser.add_argument("--max-k", type=int, default=1 << 16, help="where the largest-K search (k) stops")
    parser.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode of the hand-written step (default: reduce-overhead on CUDA, default on CPU)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cores = pin_cpus(args.threads) if device.type == "cpu" else None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available (torch.cuda.is_available() is False)")
        torch.set_default_device(device)  # the hand-written steps and Pyro's runs create tensors there
        SYNC = functools.partial(torch.cuda.synchronize, device)
    mode = args.compile_mode or ("reduce-overhead" if device.type == "cuda" else None)
    steps, repeats = (3, 1) if args.tiny else (20, 2) if args.quick else (200, 3)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"torch {torch.__version__}, pyro {pyro.__version__}, device {device} ({name}), {args.threads} thread(s)"
        + (f" on core(s) {sorted(cores)}" if cores else "")
        + f", medians of {repeats} interleaved blocks of {steps} steps"
    )
    if "a" in args.tables:
        print("\n(a) seconds per step, one particle, Adam\n")
        print("\n".join(table_a(steps, repeats, args.device)), flush=True)
    if "k" in args.tables:
        print("\n(k) " + largest_k(args.device, args.vae_batch, 128, 256 if args.tiny else args.max_k), flush=True)
    if "b" in args.tables:
        ks = [int(k) for k in args.vae_k.split(",")]
        print(f"\n(b) VAE on digits, batch {args.vae_batch}, seconds per step\n")
        print(
            "\n".join(
                table_b(
                    max(3, steps // 10), repeats, args.device, args.vae_batch, ks, args.vae_objectives.split(","), mode
                )
            ),
            flush=True,
        )
    if "c" in args.tables:
        print("\n(c) compile time (capture + inductor), fresh process each\n")
        print("\n".join(table_c()))


if __name__ == "__main__":
    main()
