"""to_inference_data on a guide that was never trained: an autoguide's generic initial values are
not a posterior (warned), and a parameter read without an initial value is named."""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

import pyro_elbo
from pyro_elbo._pyro.untrained import UntrainedGuideWarning

DATA = torch.tensor([0.3, 1.2, 0.8, 1.9])


def model(x: torch.Tensor) -> None:
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(loc, 1.0), obs=x)


def test_an_untrained_autoguide_is_warned_and_a_trained_one_is_not() -> None:
    guide = AutoNormal(model)
    with pytest.warns(
        UntrainedGuideWarning, match=r"parameters \['AutoNormal.locs.loc', 'AutoNormal.scales.loc'\] did"
    ):
        pyro_elbo.to_inference_data(model, guide, DATA, num_samples=20, predictive=False)
    pyro.clear_param_store()
    guide = AutoNormal(model)
    pyro_elbo.fit(model, guide, DATA, num_steps=20, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedGuideWarning)
        pyro_elbo.to_inference_data(model, guide, DATA, num_samples=20, predictive=False)


def test_a_parameter_without_an_initial_value_is_named() -> None:
    def guide(x: torch.Tensor) -> None:
        pyro.sample("loc", dist.Normal(pyro.param("g_loc"), 1.0))

    with pytest.raises(ValueError, match=r"the guide reads pyro.param\('g_loc'\) without an initial value"):
        pyro_elbo.to_inference_data(model, guide, DATA, num_samples=20)
