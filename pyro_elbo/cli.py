"""The ``pyro-elbo`` command: fit a model file, diagnose the guide, export to ArviZ.

``pyro-elbo run FILE[:MODEL]`` imports ``FILE`` (a Python file defining ``model``, optionally
``guide``, ``data()`` returning the model's args, optionally ``full_data()`` returning the args
of the whole data set for the report and the export when ``data()`` subsamples, and ``dims``/``coords``
for ArviZ), fits it with a
progress bar, prints the KL-gap report and writes into ``--out``: ``inference_data.nc``,
``loss.png``, ``kl_gap.png``, ``posterior.png``, ``report.txt`` and ``checkpoint.pt``.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import sys
import time
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


VECTORIZE = ("auto", "plate", "vmap", "sequential")
OUTPUTS = ("checkpoint.pt", "loss.png", "report.txt", "kl_gap.png", "inference_data.nc", "posterior.png")


class UsageError(Exception):
    """A mistake on the command line or in the model file: reported in one line, exit code 2."""


def count(text: str) -> int:
    """A whole number, also written ``1e6`` or ``10_000``."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(value)


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
        "AutoNormal(model)), `data()` returning the model's positional args, optionally `full_data()` "
        "(the whole data set, for the report and export of a model trained on minibatches), and `dims`/`coords` "
        "for ArviZ. FILE:NAME picks another model function in the file.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "file", metavar="FILE[:MODEL]", help="Python file with the model (and :NAME of the model function)"
    )
    run.add_argument("--guide", default="guide", help="name of the guide in FILE (default: guide, else AutoNormal)")
    run.add_argument("--objective", default="elbo", help="elbo, iwae, dreg, stl, renyi, cubo or vimco (default: elbo)")
    run.add_argument("--particles", type=count, default=None, help="particles per step (default: the objective's)")
    run.add_argument("--steps", type=count, default=2000, help="optimizer steps (default: 2000)")
    run.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (default: 0.01)")
    run.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: where the data are)")
    run.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed of the fit, the KL-gap report and the exported draws (default: 0)",
    )
    run.add_argument("--out", default="pyro-elbo-out", help="output folder (default: pyro-elbo-out)")
    run.add_argument("--samples", type=count, default=1000, help="posterior draws exported to ArviZ (default: 1000)")
    run.add_argument(
        "--diagnostic-particles", type=count, default=10_000, help="particles for the KL-gap report (default: 10000)"
    )
    run.add_argument(
        "--vectorize",
        choices=VECTORIZE,
        default="auto",
        help="how particles are evaluated in the fit, the report and the export: auto (the fastest path the "
        "model runs on), plate (one vectorized pass), vmap (torch.func.vmap, for models that cannot "
        "broadcast) or sequential (one at a time) (default: auto)",
    )
    run.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default=None,
        help="torch default dtype for the model file and "
        "its data (default: torch's, float32); float64 lowers the report's noise floor",
    )
    run.add_argument(
        "--log-likelihood",
        choices=("auto", "separate", "combined"),
        default="auto",
        help="ArviZ log_likelihood: one "
        "per observed site, or combined: their sum per data point over the plate they share, so that "
        "az.loo needs no var_name; auto (default): combined for several observed sites that share a plate",
    )
    run.add_argument(
        "--compile",
        nargs="?",
        choices=tuple(COMPILE_MODES),
        const="on",
        default=None,
        help="auto (the default): compile the whole step only when that pays off within the run, in a child "
        "process while training goes on eagerly where a core is idle; on (also plain --compile): compile at "
        "the first step; off: never (the only mode whose runs repeat bit for bit whatever the machine's load). "
        "With --resume and no --compile, the checkpoint's own mode",
    )
    run.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="continue from OUT/checkpoint.pt if it exists (--no-resume, the default: start a new run, overwriting it)",
    )
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
        return _run_with_resume_refusals_as_usage_errors(args)
    except UsageError as error:
        _report_error(error, args.traceback, hint=False)
        return 2
    except KeyboardInterrupt:
        print(f"pyro-elbo: interrupted (SIGINT); {_checkpoint_left(args)}", file=sys.stderr)
        return 130
    except SystemExit as stop:  # fit's TrainingTerminated (SIGTERM), after its checkpoint
        if stop.code != 143:
            raise
        print(f"pyro-elbo: stopped by SIGTERM; {_checkpoint_left(args)}", file=sys.stderr)
        return 143
    except Exception as error:
        _report_error(error, args.traceback, hint=True, prefix=f"{type(error).__name__}: ")
        return 1


def _checkpoint_left(args: argparse.Namespace) -> str:
    """What an interrupted run leaves to resume from, as it is on disk."""
    from pyro_elbo.train.checkpoint import load_checkpoint

    path = Path(args.out) / "checkpoint.pt"
    if not path.exists():
        return f"no checkpoint was written to {path}, so nothing can be resumed; rerun to start again"
    try:
        step = load_checkpoint(path)["step"]
    except ValueError as error:
        return f"{path} cannot be resumed ({error})"
    return f"{path} holds step {step} of {args.steps}; rerun with --resume and the same options to continue"


def _report_error(error: BaseException, show_traceback: bool, hint: bool, prefix: str = "") -> None:
    """The whole message (a library error's hint often sits on its later lines); the traceback,
    with the error's causes (an import failure's own traceback), under ``--traceback``."""
    if show_traceback:
        traceback.print_exception(type(error), error, error.__traceback__)
    print(f"pyro-elbo: error: {prefix}{str(error).strip()}", file=sys.stderr)
    if hint and not show_traceback:
        print("pyro-elbo: rerun with --traceback for details", file=sys.stderr)


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
        raise UsageError(
            f"{path_text} defines no function `{name}` (callables defined: {', '.join(defined) or 'none'})"
        )
    return module, name


#: ``--compile``'s values and what ``fit(compile=...)`` gets for each
COMPILE_MODES: dict[str, bool | str] = {"auto": "auto", "on": True, "off": False}


def _compile_mode(args: argparse.Namespace, checkpoint: Path) -> bool | str:
    """``fit``'s ``compile``: the one ``--compile`` names; without it, ``"auto"``, or with
    ``--resume`` the mode the checkpoint was written with (a resumed run keeps its path, which
    ``fit`` requires)."""
    if args.compile is not None:
        return COMPILE_MODES[args.compile]
    if args.resume and checkpoint.exists():
        from pyro_elbo.train.checkpoint import load_checkpoint

        try:
            saved = load_checkpoint(checkpoint, map_location="cpu").get("settings", {}).get("compile")
        except Exception:  # an unreadable checkpoint: fit's own load names the problem
            saved = None
        if saved in ("auto", True, False):
            return bool(saved) if isinstance(saved, bool) else "auto"
    return "auto"


def run(args: argparse.Namespace) -> int:
    import pyro
    import torch

    import pyro_elbo

    pyro.clear_param_store()  # a fresh fit (or --resume's checkpoint), also when main() runs twice in a process
    logging.getLogger("pyro_elbo.train").setLevel(logging.ERROR)  # main() words a signal's stop for the CLI
    if args.steps < 0 or args.samples < 1 or args.diagnostic_particles < 2:
        raise UsageError("--steps must be >= 0, --samples >= 1 and --diagnostic-particles >= 2")
    vectorize = {"vectorize_particles": args.vectorize}  # the library's own names, passed unchanged
    try:
        objective = pyro_elbo.make_objective(args.objective, num_particles=args.particles, **vectorize)
    except (ValueError, TypeError) as error:
        raise UsageError(str(error)) from error
    device = _parse_device(args.device)
    if args.dtype is not None:
        torch.set_default_dtype(getattr(torch, args.dtype))
    module, model_name = load_model_file(args.file)
    model = getattr(module, model_name)
    data = getattr(module, "data", None)
    model_args = tuple(_as_dtype(a, args.dtype) for a in (data() if callable(data) else ()))
    guide, guide_label = _pick_guide(args, module, model, model_name)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time() - 1.0  # outputs older than this run (its clock's coarseness aside) are not its own
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
        compile=_compile_mode(args, out / "checkpoint.pt"),
    )
    if result.resumed_from_step is not None and args.no_progress:  # (the progress bar wrote it)
        print(f"resumed from step {result.resumed_from_step}")
    final = result.history[-1] if result.history else float("nan")
    summary = f"fit: {result.num_steps} steps, final loss {final:.4f}, {result.num_skipped} skipped"
    print(summary)
    if result.compile_decision is not None:  # timings: printed, not in report.txt (a seed fixes the report)
        print(result.compile_decision)
    full_data = getattr(module, "full_data", None)  # a model trained on minibatches: diagnose all the data
    if callable(full_data):
        model_args = tuple(_as_dtype(a, args.dtype) for a in full_data())
    if device is not None:
        model_args = tuple(a.to(device) if hasattr(a, "to") else a for a in model_args)
    failed = _after_fit(args, module, model, guide, model_args, result, summary, vectorize)
    written = [name for name in OUTPUTS if (out / name).exists() and (out / name).stat().st_mtime >= started]
    print()
    print(f"wrote {out}/{', '.join(written)}")
    if failed:
        print(
            f"pyro-elbo: error: {' and '.join(failed)} failed after a successful fit; the fit is kept in "
            f"{out}/checkpoint.pt: fix the cause and rerun with --resume and the same --steps to redo only "
            "the report and the export",
            file=sys.stderr,
        )
        return 1
    return 0


#: the phrases of ``fit``'s refusals to resume a checkpoint (other settings, another program, another world size)
REFUSED_RESUME = ("resume=True refuses", "belongs to a different model/guide", "resume with the same world size")


def _run_with_resume_refusals_as_usage_errors(args: argparse.Namespace) -> int:
    """:func:`run`, with ``fit``'s refusal to resume a checkpoint reported as a usage mistake (exit
    status 2) in the command's terms."""
    try:
        return run(args)
    except ValueError as error:
        if getattr(args, "resume", False) and any(mark in str(error) for mark in REFUSED_RESUME):
            raise UsageError(_refused_resume_advice(str(error), Path(args.out))) from error
        raise


def _refused_resume_advice(message: str, out: Path) -> str:
    """``fit``'s refusal to resume, in the command's terms: what differs, then what to pass."""
    what = message.split(". Nothing was loaded")[0].replace("resume=True", "--resume")
    return (
        f"{what}. Nothing was loaded or overwritten. To continue that run, pass the settings it was "
        f"started with (--lr, --objective, --particles, the same model file); to start a new run, pass "
        f"--no-resume (which overwrites {out}/checkpoint.pt) or another --out."
    )


def _after_fit(
    args: argparse.Namespace,
    module: ModuleType,
    model: Any,
    guide: Any,
    model_args: tuple[Any, ...],
    result: Any,
    summary: str,
    vectorize: dict[str, Any],
) -> list[str]:
    """Everything after a finished fit, each part on its own: one that fails is reported in full
    and the others still run. Returns the names of the parts that failed."""
    import matplotlib
    import pyro

    matplotlib.use("Agg")  # files only, no display

    import pyro_elbo

    out = Path(args.out)
    failed: list[str] = []

    def attempt(what: str, fn: Any, budget: tuple[str, str] | None = None) -> Any:
        """``budget``: the library's fail-fast message on a size (``kl_gap(num_particles=``) and the
        option that sets it, named in a last line."""
        try:
            return fn()
        except Exception as error:
            failed.append(what)
            _report_error(error, args.traceback, hint=False, prefix=f"{what} failed: {type(error).__name__}: ")
            if budget is not None and isinstance(error, ValueError) and str(error).startswith(budget[0]):
                value = getattr(args, budget[1][2:].replace("-", "_"))
                print(f"pyro-elbo: lower {budget[1]} (now {value})", file=sys.stderr)
            return None

    def loss_plot() -> None:
        fig = result.plot()
        fig.axes[0].set_title(f"{Path(args.file).name}: {result.num_steps} steps, lr {args.lr:g}", fontsize=9)
        _save(fig, out / "loss.png", dpi=120, bbox_inches="tight")

    attempt("the loss plot", loss_plot)

    def report() -> Any:
        pyro.set_rng_seed(args.seed)
        return pyro_elbo.kl_gap(model, guide, *model_args, num_particles=args.diagnostic_particles, **vectorize)

    kl = attempt("the KL-gap report", report, ("kl_gap(num_particles=", "--diagnostic-particles"))
    if kl is not None:
        print()
        print(kl)
        attempt(
            "the KL-gap plot",
            lambda: _save(_legend_outside(kl.plot()), out / "kl_gap.png", dpi=120, bbox_inches="tight"),
        )
    text = str(kl) if kl is not None else "KL-gap report: failed (see the error printed by pyro-elbo)"
    (out / "report.txt").write_text(f"{summary}\n\n{text}\n")

    def export() -> Any:
        pyro.set_rng_seed(args.seed)
        idata = pyro_elbo.to_inference_data(
            model,
            guide,
            *model_args,
            num_samples=args.samples,
            dims=getattr(module, "dims", None),
            coords=getattr(module, "coords", None),
            fit_result=result,
            log_likelihood=args.log_likelihood,
            **vectorize,
        )
        from pyro_elbo.arviz import to_netcdf

        to_netcdf(idata, out / "inference_data.nc")
        return idata

    idata = attempt("the ArviZ export", export, ("to_inference_data(num_samples=", "--samples"))
    if idata is not None:
        attempt("the variational LOO", lambda: _loo_report(idata, out))
        attempt("the posterior plot", lambda: _posterior_plot(idata, out))
    return failed


def _loo_report(idata: Any, out: Path) -> None:
    """Print the corrected PSIS-LOO of the export and append it to ``report.txt`` (nothing for a
    model without observed sites)."""
    from pyro_elbo.loo import report_text

    if "log_likelihood" not in (idata.groups() if callable(idata.groups) else idata.children):
        return
    text = report_text(idata)
    print()
    print(text)
    with (out / "report.txt").open("a") as report:
        report.write(f"\n{text}\n")


def _as_dtype(value: Any, dtype: str | None) -> Any:
    import torch

    if dtype is None or not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return value
    return value.to(getattr(torch, dtype))


def _pick_guide(args: argparse.Namespace, module: ModuleType, model: Any, model_name: str) -> tuple[Any, str]:
    guide = None
    if args.guide != "guide" or model_name == "model":  # FILE's `guide` is written for `model`
        guide = getattr(module, args.guide, None)
        if args.guide != "guide" and not callable(guide):
            raise UsageError(f"{args.file.partition(':')[0]} defines no guide `{args.guide}`")
    if callable(guide):
        return guide, args.guide
    from pyro.infer.autoguide import AutoNormal

    return AutoNormal(model), "AutoNormal (default)"


def _legend_outside(fig: Any) -> Any:
    """Move the legend right of the axes: inside, it sits on the ELBO line and the ladder's end."""
    ax = fig.axes[0]
    if ax.get_legend() is not None:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    ax.set_ylabel("bound on log p(x) (nats)")
    return fig


def _save(fig: Any, path: Path, **options: Any) -> None:
    import matplotlib.pyplot as plt

    try:
        fig.savefig(path, **options)
    finally:
        plt.close(fig)


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


def _forest_rows(posterior: Any, budget: int = 40) -> tuple[list[str], dict[str, Any], int, str]:
    """Which variables (and entries) fit a readable forest of about ``budget`` rows: the smallest
    variables whole, then the first entries of the next one; the caption says what is left out."""

    def width(var: Any) -> int:
        return int(var.size // (var.sizes["chain"] * var.sizes["draw"]))

    sized = sorted(posterior.data_vars.items(), key=lambda kv: width(kv[1]))
    names, rows, coords, notes = [], 0, {}, []
    for name, var in sized:
        if rows + width(var) <= budget:
            names.append(name)
            rows += width(var)
    rest = [(n, v) for n, v in sized if n not in names]
    if rest:
        name, var = rest[0]
        room, taken = max(budget - rows, 8), 1
        for dim in reversed([d for d in var.dims if d not in ("chain", "draw")]):
            take = max(1, min(var.sizes[dim], room // taken))
            coords[dim] = var[dim].values[:take]
            taken *= take
        names.append(name)
        rows += taken
        notes.append(f"{name}: first {taken} of {width(var)} entries")
        if rest[1:]:
            notes.append("not shown: " + ", ".join(f"{n} ({width(v)})" for n, v in rest[1:]))
    return names, coords, rows, "; ".join(notes)


def _posterior_plot(idata: Any, out: Path) -> None:
    """A forest of the guide's draws (median, 50% and 94% HDI), at most about 40 rows."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import arviz as az

        names, coords, rows, note = _forest_rows(idata["posterior"])
        size = (6.5, 1.2 + 0.28 * max(rows, 1))
        title = "posterior (guide draws): median, 50% and 94% HDI" + (f"\n{note}" if note else "")
        if int(az.__version__.split(".")[0]) >= 1:  # arviz-plots: a PlotCollection on one figure
            import matplotlib.pyplot as plt

            plot_forest: Any = az.plot_forest  # ArviZ 1.x's signature (type-checked against 0.x)
            plot_forest(
                idata,
                var_names=names,
                coords=coords or None,
                combined=True,
                point_estimate="median",
                ci_kind="hdi",
                ci_probs=(0.5, 0.94),
                backend="matplotlib",
                figure_kwargs={"figsize": (8.5, size[1])},
            )  # wider: room for labels
            fig = plt.gcf()
            fig.suptitle(title, fontsize=9)
            _save(fig, out / "posterior.png", dpi=100, bbox_inches="tight")
            return
        axes = az.plot_forest(
            idata, var_names=names, coords=coords or None, combined=True, hdi_prob=0.94, figsize=size, textsize=9
        )
    ax = axes.ravel()[0] if hasattr(axes, "ravel") else axes
    ax.set_title(title, fontsize=9)  # replaces ArviZ's "94.0% HDI"
    _save(ax.figure, out / "posterior.png", dpi=100, bbox_inches="tight")


if __name__ == "__main__":
    sys.exit(main())
