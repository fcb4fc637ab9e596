"""A model and guide without trainable parameters: fit warns once and runs as Pyro's SVI.step does
(the loss at each step, nothing updated); compile=True and "auto" stay eager and say why."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest

import pyro_elbo
from pyro_elbo.train.loop import NothingToTrainWarning


def model():
    pyro.sample("z", dist.Normal(0.0, 1.0))


def guide():
    pyro.sample("z", dist.Normal(1.0, 1.0))


@pytest.mark.parametrize("compile", [False, True, "auto"])
def test_fit_without_parameters_warns_and_returns_the_loss_history(compile: bool | str) -> None:
    """Each loss is log q(z) - log p(z) = z - 1/2 at z ~ q = Normal(1, 1): mean KL = 1/2, sd 1. The
    mean of 400 steps is checked within 5 standard errors (two-sided false-alarm rate 6e-7)."""
    steps = 400
    with pytest.warns(NothingToTrainWarning, match="no trainable parameters.*To train, give the guide parameters"):
        result = pyro_elbo.fit(model, guide, num_steps=steps, compile=compile, progress=False)
    assert len(result.history) == steps and result.params == {}
    assert all(math.isfinite(loss) for loss in result.history)
    assert abs(sum(result.history) / steps - 0.5) <= 5 / math.sqrt(steps)
    if compile:
        assert result.compile_decision is not None
        assert result.compile_decision.startswith(f"compile={compile!r} stayed eager: the model and guide have no")
        assert result.compile_seconds is None
    else:
        assert result.compile_decision is None
