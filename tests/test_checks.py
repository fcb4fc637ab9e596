"""Invalid model/guide pairs raise a named error; valid look-alikes pass without a warning."""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoGuideList,
    AutoHierarchicalNormalMessenger,
    AutoIAFNormal,
    AutoLaplaceApproximation,
    AutoMultivariateNormal,
    AutoNormal,
    AutoNormalMessenger,
)
from torch.distributions.transforms import AffineTransform, SigmoidTransform

import pyro_elbo
from pyro_elbo._pyro import supports
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
    (
        "plate only in guide",
        model,
        plate_only_in_guide,
        ValueError,
        "inside plate 'extra' in the guide but not in the model",
    ),
    ("plate size differs", local_model, plate_size_guide, ValueError, "Plate 'data' at site 'z' has size 5"),
    (
        "event shape mismatch",
        model,
        event_shape_guide,
        ValueError,
        r"Model and guide event_dims disagree at site 'z' \(0 vs 1\): its event shape is \(\) in the model but \(2,\)",
    ),
    (
        "batch shape mismatch",
        model,
        batch_shape_guide,
        ValueError,
        r"Guide site 'z' has an invalid log_prob shape: batch shape \(2,\)",
    ),
    (
        "observed site sampled in guide",
        model,
        observed_in_guide,
        ValueError,
        "Site 'x' is observed in the model but sampled in the guide",
    ),
]


@pytest.mark.parametrize("num_particles", [1, 3])
@pytest.mark.parametrize("case", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_pairs_raise_a_named_error(case, num_particles: int) -> None:
    _, m, g, error, message = case
    for name in OBJECTIVES:
        if OBJECTIVES[name].estimator.min_particles > num_particles:  # VIMCO, CUBO need 2
            continue
        pyro.clear_param_store()
        with pytest.raises(error, match=message):
            make_objective(name, num_particles=num_particles).loss(m, g, DATA)


@pytest.mark.parametrize("name", ["dreg", "stl"])
def test_reparameterized_only_objectives_name_the_discrete_site(name: str) -> None:
    with pytest.raises(ValueError, match="'k' cannot be reparameterized.*ELBO.*IWAE.*VIMCO"):
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


# ---------------------------------------------------------------------------------------------
# a shape error names the observed site and both shapes, in every entry point

Y18 = torch.linspace(-1.0, 1.0, 18)


def regression_model(y):
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    with pyro.plate("data", 18):
        pyro.sample("obs", dist.Normal(a, 1.0), obs=y)


def regression_guide(y):
    pyro.sample("a", dist.Normal(pyro.param("a_loc", torch.tensor(0.0)), 1.0))


OBS_SHAPE = r"Observed site 'obs' inside plate 'data'.*value has shape \(18, 1\) but the model expects \(18,\)"


@pytest.mark.parametrize(
    "objective",
    [pyro_elbo.ELBO(), pyro_elbo.IWAE(num_particles=4), pyro_elbo.IWAE(num_particles=4, vectorize_particles=True)],
    ids=["ELBO", "IWAE4", "IWAE4-plate"],
)
def test_observed_data_of_the_wrong_shape_names_site_and_shapes(objective) -> None:
    assert math.isfinite(objective.loss(regression_model, regression_guide, Y18))  # the right shape runs
    pyro.clear_param_store()
    with pytest.raises(ValueError, match=OBS_SHAPE):
        objective.loss(regression_model, regression_guide, Y18.unsqueeze(-1))


def test_observed_shape_error_in_kl_gap_and_export() -> None:
    with pytest.raises(ValueError, match=OBS_SHAPE):
        pyro_elbo.kl_gap(regression_model, regression_guide, Y18.unsqueeze(-1), num_particles=20, chunk_size=10)
    with pytest.raises(ValueError, match=OBS_SHAPE):
        pyro_elbo.to_inference_data(regression_model, regression_guide, Y18.unsqueeze(-1), num_samples=10)


def test_diagnose_shape_failure_reruns_without_the_particle_plate() -> None:
    from pyro_elbo._pyro.checks import diagnose_shape_failure

    error = diagnose_shape_failure(regression_model, regression_guide, (Y18.unsqueeze(-1),), {}, 1)
    assert isinstance(error, ValueError) and "Observed site 'obs'" in str(error)
    assert diagnose_shape_failure(regression_model, regression_guide, (Y18,), {}, 1) is None

    def clash(y):
        pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("a", dist.Normal(0.0, 1.0))

    assert isinstance(diagnose_shape_failure(clash, regression_guide, (Y18,), {}, 1), RuntimeError)

    def unbatched(y):  # runs alone, not under a particle plate: no diagnosis, the caller explains
        w = pyro.sample("a", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 18):
            pyro.sample("obs", dist.Normal(w.reshape(()), 1.0), obs=y)

    assert diagnose_shape_failure(unbatched, regression_guide, (Y18,), {}, 1) is None
    state = torch.get_rng_state()
    diagnose_shape_failure(regression_model, regression_guide, (Y18,), {}, 1)
    assert torch.equal(state, torch.get_rng_state())  # the caller's random stream is untouched


def test_a_size_less_plate_passes_the_checks() -> None:
    from pyro.poutine import replay, trace

    from pyro_elbo._pyro.checks import check_model_guide

    def program():
        with pyro.plate("plate"):
            pyro.sample("x", dist.Normal(pyro.param("loc", torch.tensor(0.0)), 1.0).expand_by([10]))

    guide_trace = trace(program).get_trace()
    check_model_guide(trace(replay(program, trace=guide_trace)).get_trace(), guide_trace, 1)


# ---------------------------------------------------------------------------------------------
# a guide whose support is wider than the model's


def positive_model():
    scale = pyro.sample("scale", dist.HalfCauchy(1.0))
    rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
    with pyro.plate("data", 4):
        pyro.sample("x", dist.Normal(0.0, scale * rate), obs=DATA)


def normal_guide_for(wide: str):
    def guide():
        for name in ("scale", "rate"):
            loc = pyro.param(f"{name}_loc", torch.tensor(2.0))
            if name == wide:
                pyro.sample(name, dist.Normal(loc, 0.1))
            else:
                pyro.sample(name, dist.LogNormal(loc, 0.1))

    return guide


@pytest.mark.parametrize("wide", ["scale", "rate"])
def test_a_real_guide_for_a_positive_latent_is_warned_about_once_and_runs(wide: str) -> None:
    # loc 2, scale 0.1: a negative draw has probability Phi(-20), so only the support check can see it
    from pyro_elbo._pyro.supports import SupportWarning

    for objective in (pyro_elbo.ELBO(), pyro_elbo.IWAE(num_particles=4)):
        pyro.clear_param_store()
        supports._warned.clear()
        with pytest.warns(
            SupportWarning,
            match=rf"Guide site '{wide}' has support reals in \[-inf, inf\], wider than the model's reals in \[0, inf\]"
            r".*KL\(q \|\| p\(z \| x\)\) is infinite.*AutoNormal",
        ) as caught:
            first = objective.loss(positive_model, normal_guide_for(wide))
        assert len([w for w in caught if issubclass(w.category, SupportWarning)]) == 1
        assert math.isfinite(first)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once: the second call is silent
            assert math.isfinite(objective.loss(positive_model, normal_guide_for(wide)))


def test_a_draw_outside_the_models_support_is_a_non_finite_loss_named_by_fit() -> None:
    """Uniform(0, 10) latent, Normal(9.5, 1) guide: P(draw > 10) = 0.31 per draw, so 100 draws all
    inside has probability 0.69**100 < 1e-16; such a draw scores -inf, and fit's refusal names the site."""
    from pyro_elbo._pyro.supports import SupportWarning

    def uniform_model():
        pyro.sample("s", dist.Uniform(0.0, 10.0))

    def uniform_guide():
        pyro.sample("s", dist.Normal(pyro.param("loc", torch.tensor(9.5)), 1.0))

    with pytest.warns(SupportWarning, match="Guide site 's'"):
        assert pyro_elbo.ELBO(num_particles=100).loss(uniform_model, uniform_guide) == math.inf
    with pytest.raises(
        pyro_elbo.NonFiniteLossError, match="model site 's' has a non-finite log-density .-inf: a value outside"
    ):
        pyro_elbo.fit(
            uniform_model, uniform_guide, num_steps=100, objective=pyro_elbo.ELBO(num_particles=100), progress=False
        )


def _single(model_fn, guide_fn):
    def model():
        pyro.sample("z", model_fn)

    def guide():
        pyro.sample("z", guide_fn)

    return model, guide


SUPPORT_PAIRS = [
    # (id, model distribution, guide distribution, outcome: "refused", "warned" or "passes")
    ("beta-uniform(-1,2)", dist.Beta(2.0, 2.0), dist.Uniform(-1.0, 2.0), "warned"),
    ("uniform(0,2)-uniform(0.5,1)", dist.Uniform(0.0, 2.0), dist.Uniform(0.5, 1.0), "passes"),
    ("uniform(0,1)-uniform(2,3)", dist.Uniform(0.0, 1.0), dist.Uniform(2.0, 3.0), "refused"),
    ("gamma-lognormal", dist.Gamma(2.0, 1.0), dist.LogNormal(0.0, 1.0), "passes"),
    ("uniform(0,10)-lognormal", dist.Uniform(0.0, 10.0), dist.LogNormal(0.0, 0.3), "warned"),
    ("poisson-normal", dist.Poisson(3.0), dist.Normal(3.0, 1.0), "refused"),
    ("dirichlet-normal", dist.Dirichlet(torch.ones(3)), dist.Normal(torch.zeros(3), 1.0).to_event(1), "refused"),
    ("dirichlet-dirichlet", dist.Dirichlet(torch.ones(3)), dist.Dirichlet(2 * torch.ones(3)), "passes"),
    ("categorical-wider", dist.Categorical(torch.ones(3)), dist.Categorical(torch.ones(5)), "warned"),
    (
        "uniform-sigmoid-affine",
        dist.Uniform(-1.0, 3.0),
        dist.TransformedDistribution(dist.Normal(0.0, 1.0), [SigmoidTransform(), AffineTransform(-1.0, 4.0)]),
        "passes",
    ),
    (  # biject_to(interval(-2.3, 1.7)) as AutoNormalMessenger pushes forward: upper end -2.3 + 4.0 = 1.7000000000000002
        "uniform-sigmoid-affine-rounded",
        dist.Uniform(-2.3, 1.7),
        dist.TransformedDistribution(dist.Normal(0.0, 1.0), [SigmoidTransform(), AffineTransform(-2.3, 1.7 + 2.3)]),
        "passes",
    ),
    (
        "uniform-sigmoid-affine-wider",
        dist.Uniform(-1.0, 3.0),
        dist.TransformedDistribution(dist.Normal(0.0, 1.0), [SigmoidTransform(), AffineTransform(-2.0, 6.0)]),
        "warned",
    ),
    ("halfcauchy-delta", dist.HalfCauchy(1.0), dist.Delta(torch.tensor(0.5)), "passes"),
]


@pytest.mark.parametrize("case", SUPPORT_PAIRS, ids=[c[0] for c in SUPPORT_PAIRS])
def test_support_comparison(case) -> None:
    from pyro.poutine import replay, trace

    from pyro_elbo._pyro.supports import SupportWarning, check_supports

    _, model_fn, guide_fn, outcome = case
    model, guide = _single(model_fn, guide_fn)
    guide_trace = trace(guide).get_trace()
    model_trace = trace(replay(model, trace=guide_trace)).get_trace()
    if outcome == "refused":
        with pytest.raises(ValueError, match="Guide site 'z' has support .* almost surely outside the model's"):
            check_supports(model_trace, guide_trace)
    elif outcome == "warned":
        with pytest.warns(SupportWarning, match="Guide site 'z' has support .* wider than the model's"):
            assert check_supports(model_trace, guide_trace) == ("z",)
    else:
        assert check_supports(model_trace, guide_trace) == ()


def test_tensor_bounds_are_compared_only_with_validation_on() -> None:
    """A step being captured runs with validation off and fake tensors: no data-dependent branch."""
    from pyro.poutine import replay, trace

    from pyro_elbo._pyro.supports import check_supports

    model, guide = _single(
        dist.Uniform(torch.zeros(2), 1.0).to_event(1), dist.Uniform(torch.full((2,), -1.0), 1.0).to_event(1)
    )
    guide_trace = trace(guide).get_trace()
    model_trace = trace(replay(model, trace=guide_trace)).get_trace()
    with pytest.warns(UserWarning, match="wider than the model's reals in \\[0, 1\\]"):
        assert check_supports(model_trace, guide_trace) == ("z",)
    with pyro.validation_enabled(False):
        assert check_supports(model_trace, guide_trace) == ()


def constrained_model():
    rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
    u = pyro.sample("u", dist.Uniform(-1.0, 3.0))
    b = pyro.sample("b", dist.Beta(2.0, 2.0))
    w = pyro.sample("w", dist.Dirichlet(torch.ones(3)))
    with pyro.plate("data", 4):
        pyro.sample("x", dist.Normal(u * b + w[..., 0], rate), obs=DATA)


def _guide_list(model):
    guides = AutoGuideList(model)
    guides.append(AutoNormal(pyro.poutine.block(model, expose=["rate", "u"])))
    guides.append(AutoDelta(pyro.poutine.block(model, hide=["rate", "u"])))
    return guides


AUTOGUIDES = {
    "AutoNormal": AutoNormal,
    "AutoDiagonalNormal": AutoDiagonalNormal,
    "AutoMultivariateNormal": AutoMultivariateNormal,
    "AutoDelta": AutoDelta,
    "AutoLaplaceApproximation": AutoLaplaceApproximation,
    "AutoIAFNormal": AutoIAFNormal,
    "AutoGuideList": _guide_list,
    "AutoNormalMessenger": AutoNormalMessenger,
    "AutoHierarchicalNormalMessenger": AutoHierarchicalNormalMessenger,
}


@pytest.mark.parametrize("name", AUTOGUIDES)
def test_autoguides_on_constrained_latents_pass_the_support_check(name: str) -> None:
    for objective in (pyro_elbo.ELBO(), pyro_elbo.IWAE(num_particles=3)):
        pyro.clear_param_store()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loss = objective.loss(constrained_model, AUTOGUIDES[name](constrained_model))
        assert math.isfinite(loss)
