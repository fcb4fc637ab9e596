"""Guide-side enumeration (``config_enumerate`` on the guide, as Pyro's semi-supervised VAE and
scANVI do): ELBO's value and gradients equal ``TraceEnum_ELBO``'s on the same draws, and the
importance weight holds the exact sum over the guide's enumerated values; the ArviZ export and LOO
draw the enumerated label from the guide (q(y | x)) and correct for it."""

from __future__ import annotations

import math
import statistics
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate
from torch import nn

import pyro_elbo
from pyro_elbo.compile.graph import CompiledLoss

from models import relative_tolerance

K, N, D, X = 3, 4, 2, 5


class _SSVAELike:
    """ss_vae_M2's structure: z ~ N(0, I), y ~ OneHotCategorical, x | y, z; the guide's classifier
    q(y | x) is enumerated and the encoder q(z | x, y) sees each value of y."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.classifier = nn.Linear(X, K)
        self.encoder = nn.Linear(X + K, 2 * D)
        self.decoder = nn.Linear(D + K, X)
        self.data = torch.linspace(-1.0, 1.0, N * X).reshape(N, X)

    def model(self, xs):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", N):
            z = pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1))
            y = pyro.sample("y", dist.OneHotCategorical(logits=torch.zeros(K)))
            batch = torch.broadcast_shapes(z.shape[:-1], y.shape[:-1])
            loc = self.decoder(torch.cat([z.expand(*batch, D), y.expand(*batch, K)], -1))
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=xs)

    @config_enumerate
    def guide(self, xs):
        pyro.module("classifier", self.classifier)
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", N):
            y = pyro.sample("y", dist.OneHotCategorical(logits=self.classifier(xs)))
            batch = torch.broadcast_shapes(xs.shape[:-1], y.shape[:-1])
            h = self.encoder(torch.cat([xs.expand(*batch, X), y.expand(*batch, K)], -1))
            pyro.sample("z", dist.Normal(h[..., :D], nn.functional.softplus(h[..., D:])).to_event(1))


def _loss_and_grads(objective, program: _SSVAELike, seed: int):
    params = [p for m in (program.classifier, program.encoder, program.decoder) for p in m.parameters()]
    for p in params:
        p.grad = None
    pyro.set_rng_seed(seed)
    loss = objective.loss_and_grads(program.model, program.guide, program.data)
    return loss, [p.grad.clone() for p in params]


@pytest.mark.parametrize("num_particles", [1, 3])
def test_elbo_equals_trace_enum_elbo_on_the_same_draws(num_particles: int) -> None:
    program = _SSVAELike()
    ours = pyro_elbo.ELBO(num_particles=num_particles, vectorize_particles=True)
    theirs = TraceEnum_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
    for seed in range(2):
        loss_ours, grads_ours = _loss_and_grads(ours, program, seed)
        loss_theirs, grads_theirs = _loss_and_grads(theirs, program, seed)
        assert loss_ours == pytest.approx(loss_theirs, rel=1e-6)
        for a, b in zip(grads_ours, grads_theirs):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert any(float(g.abs().sum()) > 0 for g in grads_ours[:2]), "the classifier is trained"


def _mixture(x_obs: float):
    weights = torch.tensor([0.2, 0.5, 0.3])
    means = torch.tensor([-2.0, 0.0, 3.0])

    def model():
        y = pyro.sample("y", dist.Categorical(weights))
        z = pyro.sample("z", dist.Normal(means[y], 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(x_obs))

    @config_enumerate
    def guide():
        logits = pyro.param("logits", lambda: torch.tensor([0.3, -0.2, 0.1]))
        y = pyro.sample("y", dist.Categorical(logits=logits))
        pyro.sample("z", dist.Normal(means[y] * 0.8, 1.1))

    exact = torch.logsumexp(weights.log() + dist.Normal(means, math.sqrt(2.0)).log_prob(torch.tensor(x_obs)), 0)
    return model, guide, float(exact)


def test_importance_weight_sums_the_enumerated_values_exactly() -> None:
    """w = sum_y p(x, y, z_y) / q(z_y | y) is unbiased for p(x): with 20,000 particles the mean
    weight is within 5 standard errors of the exact p(x) (false-alarm rate ~6e-7)."""
    model, guide, exact = _mixture(0.7)
    lw = pyro_elbo.log_weights(model, guide, num_particles=20_000, max_plate_nesting=0)
    w = (lw.log_w - exact).exp()  # w / p(x)
    se = float(w.std()) / math.sqrt(w.numel())
    assert abs(float(w.mean()) - 1.0) < 5 * se, (float(w.mean()), se)
    assert lw.guide_enumerated == ("y",)


@pytest.mark.parametrize("name", ["iwae", "renyi", "vimco", "stl", "dreg", "cubo"])
def test_other_objectives_refuse_guide_enumeration_by_name(name: str) -> None:
    model, guide, _ = _mixture(0.7)
    with pytest.raises(NotImplementedError, match="'y'.*enumerated.*pyro_elbo.ELBO"):
        pyro_elbo.make_objective(name, num_particles=2).loss(model, guide)


def test_sequential_guide_enumeration_is_refused_by_name() -> None:
    model, _, _ = _mixture(0.7)

    def guide():
        y = pyro.sample("y", dist.Categorical(logits=torch.zeros(3)), infer={"enumerate": "sequential"})
        pyro.sample("z", dist.Normal(y.float(), 1.0))

    with pytest.raises(NotImplementedError, match="'y'.*sequential"):
        pyro_elbo.ELBO().loss(model, guide)


def test_kl_gap_uses_trace_enum_elbo_and_brackets_log_px() -> None:
    """The ELBO row is TraceEnum_ELBO's (it depends on the classifier q(y)); the IWAE/CUBO rows use
    the exact-sum weight. Two independent 4000-particle estimates of one ELBO differ by more than
    5 sqrt(2) times the report's standard error with probability ~6e-7 (normal approximation).
    A classifier concentrated on the wrong value gives a much lower ELBO."""
    model, guide, exact = _mixture(0.7)
    pyro.set_rng_seed(0)
    report = pyro_elbo.kl_gap(model, guide, num_particles=4000)
    theirs = -TraceEnum_ELBO(num_particles=4000, vectorize_particles=True, max_plate_nesting=0).loss(model, guide)
    assert report.elbo.value == pytest.approx(theirs, abs=5 * math.sqrt(2) * report.elbo.se)
    assert report.iwae[4000].value == pytest.approx(exact, abs=0.05)
    pyro.param("logits").data = torch.tensor([5.0, -5.0, -5.0])  # q(y) concentrated on the wrong value
    worse = pyro_elbo.kl_gap(model, guide, num_particles=4000)
    assert worse.elbo.value < report.elbo.value - 1.0


def _semi_supervised(program: _SSVAELike):
    """ss_vae's pair: the guide samples nothing for a labelled batch (``ys`` observed) and
    enumerates y for an unlabelled one (``ys=None``)."""

    def model(xs, ys=None):
        pyro.module("decoder", program.decoder)
        with pyro.plate("data", N):
            z = pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1))
            y = pyro.sample("y", dist.OneHotCategorical(logits=torch.zeros(K)), obs=ys)
            batch = torch.broadcast_shapes(z.shape[:-1], y.shape[:-1])
            loc = program.decoder(torch.cat([z.expand(*batch, D), y.expand(*batch, K)], -1))
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=xs)

    @config_enumerate
    def guide(xs, ys=None):
        pyro.module("classifier", program.classifier)
        pyro.module("encoder", program.encoder)
        with pyro.plate("data", N):
            if ys is None:
                ys = pyro.sample("y", dist.OneHotCategorical(logits=program.classifier(xs)))
            batch = torch.broadcast_shapes(xs.shape[:-1], ys.shape[:-1])
            h = program.encoder(torch.cat([xs.expand(*batch, X), ys.expand(*batch, K)], -1))
            pyro.sample("z", dist.Normal(h[..., :D], nn.functional.softplus(h[..., D:])).to_event(1))

    labels = torch.nn.functional.one_hot(torch.arange(N) % K, K).to(torch.get_default_dtype())
    return model, guide, labels


def test_a_guide_that_enumerates_only_unlabelled_batches() -> None:
    """ss_vae's guide samples nothing for labelled batches (y observed) and enumerates y for
    unlabelled ones; the same objective takes both, in either order."""
    program = _SSVAELike()
    model, guide, labels = _semi_supervised(program)
    objective = pyro_elbo.ELBO()
    for ys in (labels, None, labels, None):
        pyro.set_rng_seed(0)
        ours = objective.loss(model, guide, program.data, ys)
        pyro.set_rng_seed(0)
        theirs = TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False).loss(
            model, guide, program.data, ys
        )
        assert ours == pytest.approx(theirs, rel=1e-6)


# --- the ArviZ export and LOO of a guide that enumerates ----------------------------------------


def _elpd(loo) -> float:
    return float(loo.elpd_loo if hasattr(loo, "elpd_loo") else loo.elpd)  # ArviZ 0.x / 1.x


def _example(name: str):
    import pyro_examples_models

    return pyro_examples_models.EXAMPLES[name]()


@pytest.mark.parametrize("name", ["ss_vae_enum", "scanvi"])
def test_export_of_an_enumerating_guide_is_that_of_the_guide_sampling_its_label(name: str) -> None:
    """The export draws the enumerated label from q(y | x) and the rest given it, as the same guide
    without config_enumerate does: with one seed, every exported array is the same."""
    example = _example(name)
    sampled_guide = example.model.__self__.guide  # the guide config_enumerate wrapped
    exports = []
    for guide in (example.guide, sampled_guide):
        pyro.set_rng_seed(3)
        exports.append(pyro_elbo.to_inference_data(example.model, guide, *example.args, num_samples=20))
    enumerated, sampled = exports
    assert "y" in enumerated.posterior
    for group in ("posterior", "posterior_predictive", "log_likelihood", "sample_stats"):
        for var in getattr(sampled, group).data_vars:
            assert (getattr(enumerated, group)[var].values == getattr(sampled, group)[var].values).all(), (group, var)


def test_exported_labels_have_the_frequencies_of_q_and_az_loo_runs() -> None:
    """ss_vae: the S exported labels of each data point are S draws from q(y | x_i) (its
    classifier's probabilities): Pearson's chi-square over all points (N (K - 1) degrees of
    freedom; every expected count is above 20) stays below its 1 - 1e-4 quantile (false-alarm
    rate 1e-4). ArviZ's own az.loo runs on the export."""
    import arviz as az
    from scipy.stats import chi2

    example = _example("ss_vae_enum")
    xs = example.args[0]
    num = 400
    data = pyro_elbo.to_inference_data(example.model, example.guide, xs, num_samples=num, predictive=False)
    labels = data.posterior["y"].values.reshape(num, *data.posterior["y"].shape[2:])  # [S, N, K] one-hot
    assert set(labels.sum(-1).ravel()) == {1.0}
    with torch.no_grad():
        expected = num * example.model.__self__.encoder_y(xs).double().numpy()
    assert expected.min() > 20
    statistic = float((((labels.sum(0) - expected) ** 2) / expected).sum())
    dof = xs.shape[0] * (expected.shape[-1] - 1)
    assert statistic < chi2.ppf(1 - 1e-4, dof), (statistic, dof)
    with warnings.catch_warnings():  # ArviZ's caution on high Pareto k (an untrained guide), if it comes
        warnings.simplefilter("ignore", UserWarning)
        elpd = az.loo(data)
    assert math.isfinite(_elpd(elpd))


_SX = 2.0
_V = 1.0 / (1.0 + 1.0 / _SX**2)  # posterior variance of z given y and x


def _weights_and_means() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([0.2, 0.5, 0.3]), torch.tensor([-2.0, 0.0, 3.0])


def _data() -> torch.Tensor:
    return torch.tensor([-2.5, -1.0, 0.3, 0.8, 2.5, 3.7])


def _mixture_model(x):
    """Per data point: y ~ Categorical(W), z | y ~ N(MU_y, 1), x | z ~ N(z, SX)."""
    weights, means = _weights_and_means()
    with pyro.plate("data", len(x)):
        y = pyro.sample("y", dist.Categorical(weights))
        z = pyro.sample("z", dist.Normal(means[y], 1.0))
        pyro.sample("x", dist.Normal(z, _SX), obs=x)


def _mixture_guide(x):
    """Close to the exact posterior, not equal (tempered labels, wider z), so that log p - log q
    varies and the LOO correction matters."""
    _, means = _weights_and_means()
    with pyro.plate("data", len(x)):
        y = pyro.sample("y", dist.Categorical(logits=0.7 * _label_logits(x)))
        pyro.sample("z", dist.Normal(_V * (means[y] + x / _SX**2), 1.2 * math.sqrt(_V)))


def _label_logits(x):
    """log p(y, x) per data point and label: the exact posterior's logits."""
    weights, means = _weights_and_means()
    return weights.log() + dist.Normal(means, math.sqrt(1.0 + _SX**2)).log_prob(x[:, None])


def test_exported_densities_of_an_enumerating_guide_include_log_q_of_the_label() -> None:
    """Each draw's log_q is log q(y_s | x) + log q(z_s | x, y_s), log_p is log p(x, y_s, z_s) and
    the pointwise log-likelihood log p(x_i | z_s), computed here by hand from the exported draws."""
    x = _data()
    weights, means = _weights_and_means()
    data = pyro_elbo.to_inference_data(
        _mixture_model, config_enumerate(_mixture_guide), x, num_samples=20, predictive=False
    )
    y = torch.as_tensor(data.posterior["y"].values).reshape(20, -1)
    z = torch.as_tensor(data.posterior["z"].values).reshape(20, -1)
    log_q_y = torch.log_softmax(0.7 * _label_logits(x), -1).gather(-1, y.T).T
    log_q_z = dist.Normal(_V * (means[y] + x / _SX**2), 1.2 * math.sqrt(_V)).log_prob(z)
    log_lik = dist.Normal(z, _SX).log_prob(x)
    log_p = weights.log()[y] + dist.Normal(means[y], 1.0).log_prob(z) + log_lik
    stats = data.sample_stats
    assert torch.allclose(torch.as_tensor(stats["log_q"].values).reshape(20), (log_q_y + log_q_z).sum(-1))
    assert torch.allclose(torch.as_tensor(stats["log_p"].values).reshape(20), log_p.sum(-1))
    assert torch.allclose(torch.as_tensor(data.log_likelihood["x"].values).reshape(20, -1), log_lik)


def test_loo_of_an_enumerating_guide_agrees_with_the_guide_sampling_its_label() -> None:
    """pyro_elbo.loo's corrected elpd of the enumerating guide and of the same guide without
    config_enumerate, each from R independent exports of S draws (other seeds for each): their
    means differ by less than Welch's t quantile (false-alarm rate 1e-4) times the standard error
    of the difference measured from the replicates. Both are far from the uncorrected az.loo of
    q's draws (more than 10 such standard errors: the correction is applied)."""
    import arviz as az
    from scipy.stats import t as student

    replicates, num = 8, 2000
    elpd: dict[str, list[float]] = {"enumerated": [], "sampled": []}
    for offset, (name, guide) in enumerate(
        (("enumerated", config_enumerate(_mixture_guide)), ("sampled", _mixture_guide))
    ):
        for seed in range(replicates):
            pyro.set_rng_seed(100 * offset + seed)
            with warnings.catch_warnings():  # a pointwise k-hat may pass good_k on a replicate
                warnings.simplefilter("ignore", pyro_elbo.VariationalLooWarning)
                elpd[name].append(_elpd(pyro_elbo.loo(_mixture_model, guide, _data(), num_samples=num)))
    means = {k: statistics.fmean(v) for k, v in elpd.items()}
    variances = {k: statistics.variance(v) / replicates for k, v in elpd.items()}
    se = math.sqrt(sum(variances.values()))
    dof = se**4 / sum(v**2 / (replicates - 1) for v in variances.values())
    assert abs(means["enumerated"] - means["sampled"]) < student.ppf(1 - 0.5e-4, dof) * se, (means, se)
    pyro.set_rng_seed(0)
    data = pyro_elbo.to_inference_data(
        _mixture_model, config_enumerate(_mixture_guide), _data(), num_samples=num, predictive=False
    )
    with warnings.catch_warnings():  # ArviZ's caution on high Pareto k, if it comes
        warnings.simplefilter("ignore", UserWarning)
        uncorrected = _elpd(az.loo(data))
    assert abs(uncorrected - means["enumerated"]) > 10 * se, (uncorrected, means, se)


# --------------------------------------------------------------------------------------------
# the compiled step (fit(compile=True)) captures the same computation


def _store_params() -> dict[str, torch.Tensor]:
    store = pyro.get_param_store()
    return {name: store._params[name] for name in store.keys()}


@pytest.mark.parametrize("num_particles", [1, 3])
def test_compiled_loss_and_gradients_equal_eager_on_the_same_draws(num_particles: int) -> None:
    """The captured graph (run uncompiled, so its draws are the eager path's) gives the eager
    loss and gradients for an unlabelled batch (y enumerated in the guide) and a labelled one
    (nothing enumerated), one graph each."""
    program = _SSVAELike()
    model, guide, labels = _semi_supervised(program)
    objective = pyro_elbo.ELBO(num_particles=num_particles)
    objective.loss(model, guide, program.data)  # create the parameters
    params = _store_params()
    compiled = CompiledLoss(objective, model, guide, backend="eager")
    for ys in (None, labels, None):
        pyro.set_rng_seed(7)
        result = compiled(params, (program.data, ys), {})
        assert result is not None, compiled.failed
        loss, finite, grads = result
        pyro.set_rng_seed(7)
        eager = objective.differentiable_loss(model, guide, program.data, ys)
        eager_grads = torch.autograd.grad(eager, list(params.values()), allow_unused=True)
        assert bool(finite)
        assert float(loss) == pytest.approx(float(eager.detach()), rel=1e-12)
        for name, g, e in zip(params, grads, eager_grads):
            expected = torch.zeros_like(g) if e is None else e
            assert torch.allclose(g, expected, rtol=1e-10, atol=1e-12), name
        classifier = [g for name, g in zip(params, grads) if name.startswith("classifier")]
        assert (ys is None) == any(float(g.abs().sum()) > 0 for g in classifier), "q(y) is trained iff enumerated"
    assert len(compiled.graphs) == 2


def test_fit_compiled_takes_the_eager_steps() -> None:
    """Three steps of ``fit(compile=True)`` (the captured graph with its in-graph Adam, run
    uncompiled) follow the eager steps on the same draws, with no fallback (a warning would fail
    the test)."""

    def run(compile_: bool) -> pyro_elbo.FitResult:
        program = _SSVAELike()
        pyro.clear_param_store()
        return pyro_elbo.fit(
            program.model, program.guide, program.data, objective=pyro_elbo.ELBO(num_particles=2), num_steps=3,
            seed=0, compile=compile_, compile_backend="eager", progress=False, optimizer_options={"foreach": False},
        )  # fmt: skip

    eager, compiled = run(False), run(True)
    assert compiled.compile_seconds is not None
    assert compiled.history == pytest.approx(eager.history, rel=relative_tolerance())
    step = 1e-2  # fit's lr: Adam moves a parameter by about lr per step, so it agrees to that scale too
    for name in eager.params:
        tolerance = {"rtol": relative_tolerance(), "atol": step * relative_tolerance()}
        assert torch.allclose(compiled.params[name], eager.params[name], **tolerance), name
    assert not torch.equal(compiled.params["classifier$$$weight"], _SSVAELike().classifier.weight)


def _mixture_elbo(logits: torch.Tensor, x_obs: float) -> torch.Tensor:
    """The exact ELBO of :func:`_mixture`'s pair: for each y the Gaussian expectations in closed
    form, weighted by q(y) = softmax(logits)."""
    weights = torch.tensor([0.2, 0.5, 0.3])
    means = torch.tensor([-2.0, 0.0, 3.0])
    loc, scale = 0.8 * means, 1.1
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    log_prior_z = -half_log_2pi - 0.5 * ((loc - means) ** 2 + scale**2)
    log_lik = -half_log_2pi - 0.5 * ((x_obs - loc) ** 2 + scale**2)
    entropy_z = 0.5 * math.log(2 * math.pi * math.e * scale**2)
    log_q_y = torch.log_softmax(logits, 0)
    return (log_q_y.exp() * (weights.log() - log_q_y + log_prior_z + log_lik + entropy_z)).sum()


def test_inductor_compiled_loss_and_gradient_are_unbiased_for_the_exact_elbo() -> None:
    """Compiled by inductor (whose draws are its own), the loss and the gradient of q(y)'s logits
    average to the closed-form ELBO's: over R = 20 calls of 500 particles each, each of the four
    quantities is within 5 standard errors of the calls' mean (false-alarm rate ~1e-4 per
    quantity, t distribution with 19 degrees of freedom)."""
    model, guide, _ = _mixture(0.7)
    objective = pyro_elbo.ELBO(num_particles=500)
    objective.loss(model, guide)
    params = _store_params()
    compiled = CompiledLoss(objective, model, guide)
    pyro.set_rng_seed(0)
    calls = []
    for _ in range(20):
        result = compiled(params, (), {})
        assert result is not None, compiled.failed
        loss, _, (grad,) = result
        calls.append(torch.cat([loss.reshape(1), grad]))
    draws = torch.stack(calls)
    logits = params["logits"].detach().clone().requires_grad_()
    exact_loss = -_mixture_elbo(logits, 0.7)
    exact = torch.cat([exact_loss.detach().reshape(1), torch.autograd.grad(exact_loss, [logits])[0]])
    se = draws.std(0) / math.sqrt(len(calls))
    assert bool(((draws.mean(0) - exact).abs() < 5 * se + 1e-12).all()), (draws.mean(0), exact, se)
    assert float(se[1:].min()) > 0
