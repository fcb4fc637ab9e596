"""Pyro's own inference tests with each ``pyro_elbo`` objective in place of ``Trace_ELBO``.

Runs the relevant parts of Pyro's ``tests/infer/`` (``test_valid_models.py``, ``test_gradient.py``,
``test_autoguide.py`` and the quick, ``--stage unit`` classes of ``test_inference.py``), taken from
Pyro's repository at a fixed commit, first as they are (the baseline, with a recording subclass of
Pyro's class) and then once per objective with ``pyro.infer.Trace_ELBO`` and
``pyro.infer.TraceMeanField_ELBO`` replaced (see ``benchmarks/pyro_infer_plugin.py``). A test
*applies* when the baseline constructed one of the two classes; only those are rerun. A test
*differs* when it passes with Pyro's class and fails, errors, is skipped or xfails with ours.

    python benchmarks/pyro_infer_suite.py --prepare-from /path/to/pyro.git   # extract the fixed commit
    python benchmarks/pyro_infer_suite.py                                    # baseline + every objective
    python benchmarks/pyro_infer_suite.py --objectives ELBO IWAE -k plate    # a subset

The Pyro tests run against the *installed* ``pyro-ppl`` (only ``tests/`` and ``setup.cfg`` are
extracted, so no source tree shadows it), under Pyro's own pytest configuration (warnings are errors).
Results (JSON per run, the Markdown table) go to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

#: Pyro's newest commit in the stored mirror (pyro-ppl 1.9.1 + fixes up to 2024-10-24; no 1.9.2 tag there).
PYRO_COMMIT = "ff6ae1c9572591791aae8842bcd702fcf0b46fd6"
OBJECTIVES = ("ELBO", "IWAE", "DReG", "STL", "RenyiELBO", "CUBO", "VIMCO")
TEST_FILES = (
    "tests/infer/test_valid_models.py",
    "tests/infer/test_gradient.py",
    "tests/infer/test_autoguide.py",
    "tests/infer/test_inference.py",
)
HERE = Path(__file__).resolve().parent
#: Skipped unless --include-slow: 500 sequential SVI steps x 10 particles each, 75-120 s per test with
#: Pyro's own class on a shared core (two of them time out at 120 s), 10 minutes of the baseline's 13.
SLOW = ("test_subsample_gradient_sequential",)


def prepare(git_dir: Path, commit: str, dest: Path) -> None:
    """Extract ``tests/`` and ``setup.cfg`` of Pyro at ``commit`` into ``dest`` (no package source)."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "--git-dir", str(git_dir), "archive", commit, "tests", "setup.cfg"], check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    (dest / "PYRO_COMMIT").write_text(commit + "\n")


def check_source(src: Path, commit: str) -> None:
    marker = src / "PYRO_COMMIT"
    if not marker.exists():
        sys.exit(f"{src} has no PYRO_COMMIT file; run with --prepare-from <pyro git dir> first")
    found = marker.read_text().strip()
    if found != commit:
        sys.exit(f"{src} holds Pyro commit {found}, expected {commit} (pass --commit to override)")
    if (src / "pyro").exists():
        sys.exit(f"{src}/pyro exists and would shadow the installed pyro-ppl; extract tests/ only")


def run_pytest(args: argparse.Namespace, mode: str, out: Path, select: Path | None) -> dict[str, Any]:
    """One pytest session over Pyro's test files in ``mode``; returns the plugin's JSON."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH", "")])),
        OMP_NUM_THREADS="1",
        PYRO_INFER_SUITE_MODE=mode,
        PYRO_INFER_SUITE_OUT=str(out),
        PYRO_INFER_SUITE_PARTICLES=str(args.particles),
    )
    env.pop("PYRO_INFER_SUITE_SELECT", None)
    env["PYRO_INFER_SUITE_PREFILTER"] = "0" if args.no_prefilter else "1"
    if select is not None:
        env["PYRO_INFER_SUITE_SELECT"] = str(select)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "pyro_infer_plugin"]
    cmd += ["--stage", "unit", f"--timeout={args.timeout}", "--tb=line", "-rN", *TEST_FILES]
    skip = [] if args.include_slow else [f"not {name}" for name in SLOW]
    if args.k or skip:
        cmd += ["-k", " and ".join([f"({args.k})" if args.k else "", *skip]).removeprefix(" and ")]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=args.pyro_src, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if not out.exists():
        sys.exit(
            f"pytest ({mode}) wrote no results (exit {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    data: dict[str, Any] = json.loads(out.read_text())
    data["seconds"] = seconds
    tail = done.stdout.strip().splitlines()[-1:] or [""]
    print(f"[{mode}] {seconds:.0f}s: {tail[0]}", file=sys.stderr, flush=True)
    return data


def compare(baseline: dict[str, Any], run: dict[str, Any], applicable: list[str]) -> dict[str, Any]:
    """Per objective: tests run, passed, differing (Pyro passes, ours does not) and the reverse."""
    tests = run["tests"]
    base = baseline["tests"]
    missing = [t for t in applicable if t not in tests]
    differing = [
        t for t in applicable if base[t]["outcome"] == "passed" and tests.get(t, {}).get("outcome") != "passed"
    ]
    better = [t for t in applicable if base[t]["outcome"] != "passed" and tests.get(t, {}).get("outcome") == "passed"]
    return {
        "run": sum(t in tests for t in applicable),
        "passed": sum(tests.get(t, {}).get("outcome") == "passed" for t in applicable),
        "differing": differing,
        "failed": sum(tests.get(t, {}).get("outcome") == "failed" for t in differing),
        "errored": sum(tests.get(t, {}).get("outcome") in ("error", "xfailed", "skipped") for t in differing),
        "better": better,
        "missing": missing,
        "seconds": run.get("seconds", 0.0),
    }


def _short(nodeid: str) -> str:
    return nodeid.removeprefix("tests/infer/")


def _signature(message: str) -> str:
    """A message with numbers, quoted names and shapes blanked, to group differences by cause."""
    text = re.sub(r"tensor\(.*", "tensor(...)", message)
    text = re.sub(r"'[^']*'", "'…'", text)
    text = re.sub(r"\[[^\]]*\]", "[…]", text)
    text = re.sub(r"-?\d+(\.\d+)?(e-?\d+)?", "#", text)
    return text[:160]


def report(baseline: dict[str, Any], runs: dict[str, dict[str, Any]], applicable: list[str]) -> str:
    base_counts = Counter(baseline["tests"][t]["outcome"] for t in applicable)
    lines = [
        f"Pyro commit {PYRO_COMMIT}, files: {', '.join(Path(f).name for f in TEST_FILES)} (`--stage unit`).",
        f"Applicable tests (construct Trace_ELBO/TraceMeanField_ELBO): {len(applicable)}; "
        f"with Pyro's class: {dict(sorted(base_counts.items()))}, {baseline.get('seconds', 0):.0f}s.",
        "",
        "| objective | particles | run | passed | differing | failed | errored/xfail/skip | passes where Pyro does not | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        c = compare(baseline, run, applicable)
        parts = "test's (Pyro default 1)" if name in ("ELBO", "STL") else f"{run['particles']} unless the test sets it"
        lines.append(
            f"| {name} | {parts} | {c['run']} | {c['passed']} | {len(c['differing'])} | {c['failed']} "
            f"| {c['errored']} | {len(c['better'])} | {c['seconds']:.0f} |"
        )
    for name, run in runs.items():
        c = compare(baseline, run, applicable)
        lines += ["", f"### {name}: {len(c['differing'])} differing", ""]
        groups: dict[str, list[str]] = {}
        for t in c["differing"]:
            entry = run["tests"].get(t, {"outcome": "missing", "message": ""})
            groups.setdefault(f"{entry['outcome']}: {_signature(entry['message'])}", []).append(t)
        for key, ids in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            example = run["tests"].get(ids[0], {}).get("message", "")
            lines.append(f"- **{len(ids)}x** `{key}`")
            lines.append(f"  - e.g. `{example[:300]}`")
            lines += [f"  - `{_short(t)}`" for t in ids]
        for t in c["better"]:
            lines.append(f"- passes here, not with Pyro ({baseline['tests'][t]['outcome']}): `{_short(t)}`")
    return "\n".join(lines)


def _expectation(nodeid: str) -> str:
    name = nodeid.split("::")[-1].split("[")[0]
    if name.endswith("_error"):
        return "reject"
    if name.endswith("_warning") or name.endswith("_warn"):
        return "warn"
    return "accept"


def valid_models_section(baseline: dict[str, Any], run: dict[str, Any], applicable: list[str], name: str) -> str:
    """The standard: each model/guide pair of test_valid_models.py, Pyro's verdict against ours."""
    ids = [t for t in applicable if "test_valid_models.py" in t]
    lines = [
        f"### test_valid_models.py pairs with {name}: {len(ids)}",
        "",
        "| test | Pyro expects | Pyro | ours | error raised by ours (Pyro's, if it differs in kind) |",
        "|---|---|---|---|---|",
    ]
    for t in ids:
        ours, base = run["tests"].get(t, {}), baseline["tests"][t]
        raised = ours.get("raised", "")
        pyro_raised = base.get("raised", "")
        note = raised[:160] if raised else ""
        if pyro_raised and raised.split(":")[0] != pyro_raised.split(":")[0]:
            note += f" (Pyro: {pyro_raised[:100]})"
        lines.append(
            f"| `{_short(t)}` | {_expectation(t)} | {base['outcome']} | {ours.get('outcome', 'missing')} | {note} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pyro-src", type=Path, default=Path("/tmp/pyro-src"), help="Pyro's tests at the commit")
    parser.add_argument("--commit", default=PYRO_COMMIT, help="the Pyro commit the source must hold")
    parser.add_argument("--prepare-from", type=Path, help="Pyro git dir to extract --commit from into --pyro-src")
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    parser.add_argument("--particles", type=int, default=4, help="multi-particle objectives' default particles")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per test (pytest-timeout)")
    parser.add_argument("--jobs", type=int, default=1, help="objectives run side by side (one process each)")
    parser.add_argument("--include-slow", action="store_true", help=f"also run {', '.join(SLOW)}")
    parser.add_argument("-k", help="pytest -k expression to restrict the tests")
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/pyro_infer_suite"))
    parser.add_argument("--no-prefilter", action="store_true", help="baseline runs every test, not a superset")
    parser.add_argument("--reuse-baseline", action="store_true", help="reuse --out-dir/pyro.json")
    parser.add_argument("--report-only", action="store_true", help="rebuild the table from --out-dir's JSON")
    args = parser.parse_args()
    if args.report_only:
        write_report(args)
        return

    if args.prepare_from is not None:
        prepare(args.prepare_from, args.commit, args.pyro_src)
    check_source(args.pyro_src, args.commit)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    base_file = args.out_dir / "pyro.json"
    if args.reuse_baseline and base_file.exists():
        baseline = json.loads(base_file.read_text())
    else:
        base_file.unlink(missing_ok=True)
        baseline = run_pytest(args, "pyro", base_file, None)
        base_file.write_text(json.dumps(baseline))
    applicable = sorted(t for t, e in baseline["tests"].items() if e["used"])
    select = args.out_dir / "applicable.txt"
    select.write_text("\n".join(applicable) + "\n")

    def one(name: str) -> None:
        out = args.out_dir / f"{name}.json"
        out.unlink(missing_ok=True)
        out.with_suffix(".run.json").write_text(json.dumps(run_pytest(args, name, out, select)))

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, args.objectives))
    write_report(args)


def write_report(args: argparse.Namespace) -> None:
    """The Markdown table (and the test_valid_models.py section) from the JSON in ``--out-dir``."""
    baseline = json.loads((args.out_dir / "pyro.json").read_text())
    applicable = sorted(t for t, e in baseline["tests"].items() if e["used"])
    runs = {}
    for name in args.objectives:
        path = args.out_dir / f"{name}.run.json"
        if path.exists():
            runs[name] = json.loads(path.read_text())
    table = report(baseline, runs, applicable)
    if "ELBO" in runs:
        table += "\n\n" + valid_models_section(baseline, runs["ELBO"], applicable, "ELBO")
    (args.out_dir / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
