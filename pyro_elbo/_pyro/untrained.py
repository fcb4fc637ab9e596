"""Whether a guide was trained before it is used as a posterior (an export, a report).

An export of an autoguide whose parameters do not exist yet draws from the guide as initialized
(its ``init_loc_fn``): a result that looks like a posterior and is not one. A hand-written guide that reads ``pyro.param("g_loc")`` without an
initial value fails in Pyro with a bare ``KeyError: 'g_loc'``.
"""

from __future__ import annotations

import warnings
from typing import Any

import pyro
import pyro.poutine as poutine
from pyro.infer.autoguide import AutoGuide, AutoMessenger
from pyro.poutine.messenger import Messenger

from pyro_elbo._random import forked_rng
from pyro_elbo._typing import Guide


class UntrainedGuideWarning(UserWarning):
    """The guide's parameters did not exist before it was used as a posterior."""


class _NewParams(Messenger):
    """Records the ``pyro.param`` names the param store does not hold yet, and refuses one read
    without an initial value by name."""

    def __init__(self, caller: str) -> None:
        super().__init__()
        self.caller = caller
        self.store = pyro.get_param_store()
        self.new: list[str] = []

    def _pyro_param(self, msg: Any) -> None:
        name = msg["name"]
        if name in self.store or name in self.new:
            return
        if len(msg["args"]) < 2:  # pyro.param(name) with no initial value, and none in the store
            raise ValueError(
                f"{self.caller}: the guide reads pyro.param({name!r}) without an initial value, and the param "
                f"store holds no {name!r}: the guide was not trained in this process (or the store was cleared). "
                f"Train it first (pyro_elbo.fit(model, guide, ...)), load its parameters "
                f"(pyro.get_param_store().load(path)), or give pyro.param({name!r}, init) an initial value."
            )
        self.new.append(name)


def check_trained(guide: Guide, args: tuple[Any, ...], kwargs: dict[str, Any], caller: str) -> None:
    """Run ``guide`` once (its random draws on a forked stream) and warn if it is an autoguide
    whose parameters did not exist before, so would be exported at their generic initial values
    (a hand-written guide's initial values are the author's choice, e.g. a known posterior).

    Raises:
        ValueError: the guide reads ``pyro.param(name)`` with no initial value and the store has no
            ``name`` (named, with what to do).
    """
    recorder = _NewParams(caller)
    with forked_rng(), poutine.block(), recorder:
        guide(*args, **kwargs)
    if recorder.new and isinstance(guide, (AutoGuide, AutoMessenger)):
        warnings.warn(
            f"{caller}: the guide's parameters {recorder.new} did not exist before this call, so the export "
            "draws from the guide at its initial values, not a trained posterior. Train it first "
            "(pyro_elbo.fit(model, guide, ...)) in this process, or load its parameters "
            "(pyro.get_param_store().load(path)).",
            UntrainedGuideWarning,
            stacklevel=3,
        )
