"""The ``pyro-elbo`` command: fit a model file, diagnose the guide, export to ArviZ.

``pyro-elbo run FILE[:MODEL]`` imports ``FILE`` (a Python file defining ``model``, optionally
``guide``, ``data()`` returning the model's args, and ``dims``/``coords`` for ArviZ), fits it with a
progress bar, prints the KL-gap report and writes into ``--out``: ``inference_data.nc``,
``loss.png``, ``kl_gap.png``, ``posterior.png``, ``report.txt`` and ``checkpoint.pt``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import traceback
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

EPILOG = """examples:
  pyro-elbo run examples/eight_schools.py
  pyro-elbo run examples/eight_schools.py:centered_model --steps 3000 --out out/centered
  pyro-elbo run examples/vae_digits.py --objective dreg --particles 16 --lr 1e-3
"""


class UsageError(Exception):
    """A mistake on the command line or in the model file: reported in one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyro-elbo",
        description="Fit a Pyro model with better variational objectives, diagnose the guide "
        "(KL gap, PSIS k-hat) and export the posterior to ArviZ.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="fit a model file end to end (fit -> KL-gap report -> ArviZ file and plots)",
        description="Fit FILE's model end to end. FILE defines `model`, optionally `guide` (default: "
        "AutoNormal(model)), `data()` returning the model's positional args, and `dims`/`coords` "
        "for ArviZ. FILE:NAME picks another model function in the file.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("file", metavar="FILE[:MODEL]", help="Python file with the model (and :NAME of the model function)")
    run.add_argument("--guide", default="guide", help="name of the guide in FILE (default: guide, else AutoNormal)")
    run.add_argument("--objective", default="elbo", help="elbo, iwae, dreg, stl, renyi, cubo or vimco (default: elbo)")
    run.add_argument("--particles", type=int, default=None, help="particles per step (default: the objective's)")
    run.add_argument("--steps", type=int, default=2000, help="optimizer steps (default: 2000)")
    run.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (default: 0.01)")
    run.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: where the data are)")
    run.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    run.add_argument("--out", default="pyro-elbo-out", help="output folder (default: pyro-elbo-out)")
    run.add_argument("--samples", type=int, default=1000, help="posterior draws exported to ArviZ (default: 1000)")
    run.add_argument(
        "--diagnostic-particles", type=int, default=10_000, help="particles for the KL-gap report (default: 10000)"
    )
    run.add_argument("--compile", action="store_true", help="capture and compile the whole step (pays off on long runs)")
    run.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return run(args)
    except UsageError as error:
        print(f"pyro-elbo: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pyro-elbo: interrupted (the last checkpoint is kept; rerun with --resume)", file=sys.stderr)
        return 130
    except Exception as error:
        if args.traceback:
            traceback.print_exc()
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        print(f"pyro-elbo: error: {type(error).__name__}: {message}", file=sys.stderr)
        if not args.traceback:
            print("pyro-elbo: rerun with --traceback for details", file=sys.stderr)
        return 1


def load_model_file(spec: str) -> tuple[ModuleType, str]:
    """Import ``FILE[:MODEL]``; return the module and the model's attribute name."""
    path_text, _, name = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    path = Path(path_text)
    if not path.is_file():
        raise UsageError(f"no such file: {path_text}")
    if path.suffix != ".py":
        raise UsageError(f"{path_text} is not a Python file")
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    if module_spec is None or module_spec.loader is None:
        raise UsageError(f"cannot import {path_text}")
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(path.resolve().parent))
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        raise UsageError(f"importing {path_text} failed: {type(error).__name__}: {error}") from error
    finally:
        sys.path.pop(0)
    name = name or "model"
    if not callable(getattr(module, name, None)):
        defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise UsageError(f"{path_text} defines no function `{name}` (callables defined: {', '.join(defined) or 'none'})")
    return module, name


def run(args: argparse.Namespace) -> int:
    import pyro_elbo

    if args.steps < 0 or args.samples < 1 or args.diagnostic_particles < 2:
        raise UsageError("--steps must be >= 0, --samples >= 1 and --diagnostic-particles >= 2")
    try:
        objective = pyro_elbo.make_objective(args.objective, num_particles=args.particles)
    except (ValueError, TypeError) as error:
        raise UsageError(str(error)) from error
    device = _parse_device(args.device)
    module, model_name = load_model_file(args.file)
    model = getattr(module, model_name)
    data = getattr(module, "data", None)
    model_args = tuple(data()) if callable(data) else ()
    guide = None
    if args.guide != "guide" or model_name == "model":  # FILE's `guide` is written for `model`
        guide = getattr(module, args.guide, None)
        if args.guide != "guide" and not callable(guide):
            raise UsageError(f"{args.file.partition(':')[0]} defines no guide `{args.guide}`")
    guide_label = args.guide
    if not callable(guide):
        from pyro.infer.autoguide import AutoNormal

        guide = AutoNormal(model)
        guide_label = "AutoNormal (default)"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"pyro-elbo: {args.file} -> {out}/  model={model_name} guide={guide_label} objective={objective!r}")
    result = pyro_elbo.fit(
        model,
        guide,
        *model_args,
        objective=objective,
        num_steps=args.steps,
        lr=args.lr,
        device=device,
        seed=args.seed,
        checkpoint=out / "checkpoint.pt",
        checkpoint_every=max(1, args.steps // 20),
        resume=args.resume,
        progress=not args.no_progress,
        compile=args.compile,
    )
    if result.resumed_from_step is not None:
        print(f"resumed from step {result.resumed_from_step}")
    final = result.history[-1] if result.history else float("nan")
    print(f"fit: {result.num_steps} steps, final loss {final:.4f}, {result.num_skipped} skipped")
    if device is not None:
        model_args = tuple(a.to(device) if hasattr(a, "to") else a for a in model_args)

    report = pyro_elbo.kl_gap(model, guide, *model_args, num_particles=args.diagnostic_particles)
    print()
    print(report)
    (out / "report.txt").write_text(str(report) + "\n")

    idata = pyro_elbo.to_inference_data(
        model,
        guide,
        *model_args,
        num_samples=args.samples,
        dims=getattr(module, "dims", None),
        coords=getattr(module, "coords", None),
        fit_result=result,
    )
    idata.to_netcdf(str(out / "inference_data.nc"))
    _plots(result, report, idata, out)
    print()
    print(f"wrote {out}/inference_data.nc, loss.png, kl_gap.png, posterior.png, report.txt, checkpoint.pt")
    return 0


def _parse_device(text: str | None) -> Any:
    if text is None:
        return None
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as error:
        raise UsageError(f"unknown device {text!r} (try cpu or cuda)") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but no CUDA device is available")
    return device


def _plots(result: Any, report: Any, idata: Any, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = result.plot()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)
    fig = report.plot()
    fig.savefig(out / "kl_gap.png", dpi=120)
    plt.close(fig)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import arviz as az

        # a compact forest of the (up to 40 rows) smallest variables, with 94% HDIs; if even the
        # smallest is larger (a VAE's local latents), its first entries
        sized = sorted(idata.posterior.data_vars.items(), key=lambda kv: kv[1].size)
        names, rows, coords, title = [], 0, None, "posterior (guide draws): median, 50% and 94% HDI"
        for name, var in sized:
            width = var.size // (var.sizes["chain"] * var.sizes["draw"])
            if rows + width <= 40:
                names.append(name)
                rows += width
        if not names and sized:
            name, var = sized[0]
            coords, rows = {}, 1
            for dim in reversed([d for d in var.dims if d not in ("chain", "draw")]):
                take = max(1, min(var.sizes[dim], 40 // rows))
                coords[dim] = var[dim].values[:take]
                rows *= take
            names = [name]
            title = f"posterior of {name}: first {rows} of {var.size // (var.sizes['chain'] * var.sizes['draw'])} entries"
        axes = az.plot_forest(idata, var_names=names or None, coords=coords, combined=True, hdi_prob=0.94,
                              figsize=(6, 1.0 + 0.28 * max(rows, 1)), textsize=9)
    fig = axes.ravel()[0].figure if hasattr(axes, "ravel") else axes.figure
    fig.suptitle(title, fontsize=9)
    fig.savefig(out / "posterior.png", dpi=100, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
