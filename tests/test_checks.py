"""Invalid model/guide pairs raise a named error; valid look-alikes pass without a warning."""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_elbo
from pyro_elbo.objectives import OBJECTIVES, make_objective

DATA = torch.tensor([0.3, -0.2, 1.1, 0.4])


def model(x):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def local_model(x):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def good_guide(x):
    pyro.sample("z", dist.Normal(pyro.param("loc", torch.tensor(0.0)), 1.0))


def typo_guide(x):
    pyro.sample("z", dist.Normal(pyro.param("loc", torch.tensor(0.0)), 1.0))
    pyro.sample("z_typo", dist.Normal(0.0, 1.0))


def missing_guide(x):
    pyro.param("loc", torch.tensor(0.0))


def plate_only_in_guide(x):
    with pyro.plate("extra", 3):
        pyro.sample("z", dist.Normal(torch.zeros(3), 1.0))


def plate_size_guide(x):
    with pyro.plate("data", len(x) + 1):
        pyro.sample("z", dist.Normal(0.0, 1.0))


def event_shape_guide(x):
    pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))


def batch_shape_guide(x):
    pyro.sample("z", dist.Normal(torch.zeros(2), 1.0))


def observed_in_guide(x):
    pyro.sample("z", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(0.0, 1.0))


def discrete_model(x):
    k = pyro.sample("k", dist.Bernoulli(0.5))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(k, 1.0), obs=x)


def discrete_guide(x):
    pyro.sample("k", dist.Bernoulli(torch.tensor(0.4)))


INVALID = [
    ("guide latent not in model", model, typo_guide, ValueError, "Guide site 'z_typo' is not a site of the model"),
    ("model latent not in guide", model, missing_guide, ValueError, "Model latent site 'z' has no counterpart"),
    ("plate only in guide", model, plate_only_in_guide, ValueError, "inside plate 'extra' in the guide but not in the model"),
    ("plate size differs", local_model, plate_size_guide, ValueError, "Plate 'data' at site 'z' has size 5"),
    ("event shape mismatch", model, event_shape_guide, ValueError, r"Site 'z' has event shape \(\) in the model but \(2,\)"),
    ("batch shape mismatch", model, batch_shape_guide, ValueError, r"Guide site 'z' has batch shape \(2,\)"),
    ("observed site sampled in guide", model, observed_in_guide, ValueError, "Site 'x' is observed in the model but sampled in the guide"),
]


@pytest.mark.parametrize("num_particles", [1, 3])
@pytest.mark.parametrize("case", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_pairs_raise_a_named_error(case, num_particles: int) -> None:
    _, m, g, error, message = case
    for name in OBJECTIVES:
        if name == "vimco" and num_particles < 2:
            continue
        pyro.clear_param_store()
        with pytest.raises(error, match=message):
            make_objective(name, num_particles=num_particles).loss(m, g, DATA)


@pytest.mark.parametrize("name", ["iwae", "dreg", "stl", "renyi", "cubo"])
def test_reparameterized_only_objectives_name_the_discrete_site(name: str) -> None:
    with pytest.raises(ValueError, match="'k' cannot be reparameterized.*ELBO.*VIMCO"):
        make_objective(name, num_particles=2).loss(discrete_model, discrete_guide, DATA)


def test_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="alpha=1"):
        pyro_elbo.RenyiELBO(alpha=1.0)
    with pytest.raises(ValueError, match="n > 1"):
        pyro_elbo.CUBO(n=1.0)
    with pytest.raises(ValueError, match="num_particles >= 1"):
        pyro_elbo.IWAE(num_particles=0)
    with pytest.raises(ValueError, match="num_particles >= 2"):
        pyro_elbo.VIMCO(num_particles=1)
    with pytest.raises(TypeError, match="num_particles must be an int"):
        pyro_elbo.ELBO(num_particles=2.5)
    with pytest.raises(ValueError, match="num_particles must be >= 1"):
        pyro_elbo.log_weights(model, good_guide, DATA, num_particles=0)


def test_nonlinear_objective_refuses_a_subsampled_plate_that_does_not_enclose_every_site() -> None:
    def sub_model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x), subsample_size=2) as idx:
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[idx])

    def sub_guide(x):
        pyro.sample("z", dist.Normal(pyro.param("loc", torch.tensor(0.0)), 1.0))
        with pyro.plate("data", len(x), subsample_size=2):
            pass

    with pytest.raises(ValueError, match=r"subsampled plate\(s\) \['data'\]"):
        pyro_elbo.IWAE(num_particles=4).loss(sub_model, sub_guide, DATA)
    assert pyro_elbo.ELBO(num_particles=4).loss(sub_model, sub_guide, DATA) == pytest.approx(
        pyro_elbo.ELBO(num_particles=4).loss(sub_model, sub_guide, DATA), abs=1e3
    )


# ---------------------------------------------------------------------------------------------
# valid look-alikes


def aux_guide(x):
    u = pyro.sample("u", dist.Normal(0.0, 1.0), infer={"is_auxiliary": True})
    pyro.sample("z", dist.Normal(u, 1.0))


def deterministic_model(x):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    pyro.deterministic("z2", z * 2)
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def deterministic_guide(x):
    z = pyro.sample("z", dist.Normal(pyro.param("loc", torch.tensor(0.0)), 1.0))
    pyro.deterministic("z_doubled", 2 * z)


def subsampled_local_model(x):
    with pyro.plate("data", len(x), subsample_size=2) as idx:
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x[idx])


def subsampled_local_guide(x):
    with pyro.plate("data", len(x), subsample_size=2):
        pyro.sample("z", dist.Normal(pyro.param("loc", torch.tensor(0.0)), 1.0))


def masked_model(x):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)), poutine_mask(False):
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def poutine_mask(mask):
    return pyro.poutine.mask(mask=mask)


VALID = [
    ("auxiliary guide site", model, aux_guide),
    ("deterministic sites", deterministic_model, deterministic_guide),
    ("subsampled data plate", subsampled_local_model, subsampled_local_guide),
    ("fully masked site", masked_model, good_guide),
]


@pytest.mark.parametrize("case", VALID, ids=[c[0] for c in VALID])
def test_valid_look_alikes_pass_silently(case) -> None:
    _, m, g = case
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in OBJECTIVES:
            pyro.clear_param_store()
            loss = make_objective(name, num_particles=3).loss(m, g, DATA)
            assert loss == loss  # not NaN


def test_fully_masked_site_contributes_nothing() -> None:
    lw = pyro_elbo.log_weights(masked_model, good_guide, DATA, num_particles=5)
    assert torch.allclose(lw.log_w.detach(), torch.zeros(5), atol=1e-12)


def test_subsampled_batch_plate_scales_outside_the_log() -> None:
    lw = pyro_elbo.log_weights(subsampled_local_model, subsampled_local_guide, DATA, num_particles=3)
    assert lw.batch_plates == ("data",) and lw.batch_scale == 2.0
    assert lw.log_w.shape == (3, 2) and lw.subsampled_plates == ()
