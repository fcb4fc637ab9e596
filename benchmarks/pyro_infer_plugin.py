"""pytest plugin for :mod:`benchmarks.pyro_infer_suite`: runs Pyro's own ``tests/infer`` with an objective swapped in.

Loaded with ``-p pyro_infer_plugin`` (``benchmarks/`` on ``PYTHONPATH``) *before* Pyro's test modules
are imported, it replaces ``pyro.infer.Trace_ELBO`` and ``pyro.infer.TraceMeanField_ELBO`` by a class
of the same name, so ``from pyro.infer import Trace_ELBO`` in the test modules, their
parametrizations (test ids use the class ``__name__``, so they are the same in every mode) and
``Elbo is Trace_ELBO`` checks all see the substitute. Nothing else in Pyro is touched: Pyro's own
subclasses (``JitTrace_ELBO``, ``TraceTailAdaptive_ELBO``) keep their real base.

Configuration (environment variables, set by the driver):

- ``PYRO_INFER_SUITE_MODE``: ``pyro`` (a recording subclass of Pyro's own class: the baseline) or the
  name of a public ``pyro_elbo`` objective (``ELBO``, ``IWAE``, ``DReG``, ``STL``, ``RenyiELBO``,
  ``CUBO``, ``VIMCO``).
- ``PYRO_INFER_SUITE_PARTICLES``: particles for the multi-particle objectives when the test passes no
  ``num_particles`` (default 4). A test's own ``num_particles`` is kept (raised to the objective's
  minimum, e.g. 2 for VIMCO). ``ELBO`` and ``STL`` keep the test's value (Pyro's default, 1).
- ``PYRO_INFER_SUITE_OUT``: JSON file the per-test outcomes are written to.
- ``PYRO_INFER_SUITE_SELECT``: optional file of node ids (one a line); other tests are deselected.
- ``PYRO_INFER_SUITE_PREFILTER=1``: deselect tests that cannot construct a substituted class (their
  parametrized ELBO is another class, or neither their parameters nor their source name one); a
  speed-up for the baseline, which then records which of the rest really construct one.

Positional arguments: ``pyro_elbo.ELBO`` claims Pyro's positional signature (``ELBO(10)``), so they
are passed through unchanged; for the other objectives (whose first positional is ``alpha`` or ``n``)
they are bound to ``pyro.infer.ELBO``'s names first, a translation only the harness does.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any

import pyro.infer
import pytest

_MODE = os.environ.get("PYRO_INFER_SUITE_MODE", "pyro")
_PARTICLES = int(os.environ.get("PYRO_INFER_SUITE_PARTICLES", "4"))
_SUBSTITUTED = ("Trace_ELBO", "TraceMeanField_ELBO")
_SINGLE_PARTICLE = ("ELBO", "STL")

_current: dict[str, Any] = {"nodeid": None}
_used: set[str] = set()
_results: dict[str, dict[str, Any]] = {}
_raised: dict[str, str] = {}


def _record_use(cls_name: str) -> None:
    if _current["nodeid"] is not None:
        _used.add(_current["nodeid"])


def _pyro_names(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Bind a test's positional arguments to the names of ``pyro.infer.ELBO.__init__``."""
    names = [p for p in inspect.signature(pyro.infer.ELBO.__init__).parameters if p != "self"]
    return {**dict(zip(names, args)), **kwargs}


def _objective_class(name: str, substituted: str) -> type:
    import pyro_elbo

    base = getattr(pyro_elbo, name)
    min_particles = base.estimator.min_particles if base.estimator is not None else 1

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        _record_use(substituted)
        if name in _SINGLE_PARTICLE:
            base.__init__(self, *args, **kwargs)  # Pyro's signature, positionals included
            return
        kwargs = _pyro_names(args, kwargs)
        kwargs.setdefault("num_particles", _PARTICLES)
        kwargs["num_particles"] = max(int(kwargs["num_particles"]), min_particles)
        base.__init__(self, **kwargs)

    return type(substituted, (base,), {"__init__": __init__, "__module__": "pyro.infer"})


def _baseline_class(substituted: str) -> type:
    base = getattr(pyro.infer, substituted)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        _record_use(substituted)
        base.__init__(self, *args, **kwargs)

    return type(substituted, (base,), {"__init__": __init__, "__module__": "pyro.infer"})


def _install() -> None:
    for substituted in _SUBSTITUTED:
        cls = _baseline_class(substituted) if _MODE == "pyro" else _objective_class(_MODE, substituted)
        setattr(pyro.infer, substituted, cls)


_install()


def _mentions(value: Any) -> bool | None:
    """Whether a parametrized value is (or calls) a substituted class; None if it is no ELBO at all."""
    if isinstance(value, type) and issubclass(value, pyro.infer.ELBO):
        return value.__name__ in _SUBSTITUTED
    code = getattr(value, "__code__", None)
    if code is not None and any("ELBO" in n or "Elbo" in n for n in (*code.co_names, value.__name__)):
        return any(n in _SUBSTITUTED for n in code.co_names)
    return None


def _may_use(item: pytest.Item) -> bool:
    """A superset of the tests that construct a substituted class (the baseline's record decides)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    verdicts = [v for v in map(_mentions, params.values()) if v is not None]
    if any(verdicts):
        return True
    if verdicts:  # parametrized over another ELBO only
        return False
    try:
        source = inspect.getsource(getattr(item, "obj", None) or (lambda: None))
    except (OSError, TypeError):
        return True
    return any(name in source for name in _SUBSTITUTED)


class _RecordingSVI(pyro.infer.SVI):
    """Pyro's ``SVI`` that notes the exception a step raises (tests that expect an error hide it)."""

    def step(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().step(*args, **kwargs)
        except Exception as error:
            if _current["nodeid"] is not None:
                _raised[_current["nodeid"]] = " ".join(f"{type(error).__name__}: {error}".split())[:400]
            raise


def _patch_svi(items: list[pytest.Item]) -> None:
    for module in {getattr(item, "module", None) for item in items}:
        if module is not None and getattr(module, "SVI", None) is pyro.infer.SVI:
            module.SVI = _RecordingSVI


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _patch_svi(items)
    select = os.environ.get("PYRO_INFER_SUITE_SELECT")
    if select:
        with open(select) as f:
            wanted = {line.strip() for line in f if line.strip()}
        keep = [item for item in items if item.nodeid in wanted]
    elif os.environ.get("PYRO_INFER_SUITE_PREFILTER") == "1":
        keep = [item for item in items if _may_use(item)]
    else:
        return
    kept = {id(item) for item in keep}
    config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept])
    items[:] = keep


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    _current["nodeid"] = item.nodeid
    try:
        return (yield)
    finally:
        _current["nodeid"] = None


def _message(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    return " ".join(text.split())[:400]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    entry = _results.setdefault(report.nodeid, {"outcome": "passed", "message": "", "duration": 0.0})
    entry["duration"] += report.duration
    if report.when == "call" and hasattr(report, "wasxfail"):
        entry["outcome"] = "xpassed" if report.passed else "xfailed"
        entry["message"] = f"xfail: {report.wasxfail}"[:400]
    elif report.failed:
        if entry["outcome"] in ("passed", "xpassed"):
            entry["outcome"] = "failed" if report.when == "call" else "error"
            entry["message"] = _message(report)
    elif report.skipped and entry["outcome"] == "passed":
        entry["outcome"] = "skipped"
        entry["message"] = _message(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    out = os.environ.get("PYRO_INFER_SUITE_OUT")
    if not out:
        return
    for nodeid, entry in _results.items():
        entry["used"] = nodeid in _used
        entry["raised"] = _raised.get(nodeid, "")
    with open(out, "w") as f:
        json.dump({"mode": _MODE, "particles": _PARTICLES, "tests": _results}, f, indent=0, sort_keys=True)
