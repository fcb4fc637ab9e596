"""Enumerated discrete latents summed out of log p(x, z).

Checked against Pyro's ``TraceEnum_ELBO`` on the same draws (same seed, same guide: the guide runs
first in both, so its draws are identical) and against log p(x) by brute-force enumeration.

The functions of :mod:`pyro_elbo._pyro.enum` are tested directly; the tests through the public
objectives run once ``log_weights`` calls them (until then they are skipped, saying why).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate
from pyro.ops.indexing import Vindex
from torch import Tensor

import pyro_elbo
from pyro_elbo._pyro import enum
from pyro_elbo._pyro import log_weights as lw_module
from pyro_elbo._pyro.log_weights import Reducer, particle_plated, scored_sites, traces

WIRED = hasattr(lw_module, "enum")
needs_wiring = pytest.mark.skipif(
    not WIRED, reason="enumeration not wired into pyro_elbo/_pyro/log_weights.py yet (/tmp/team/enum_wiring.diff)"
)


def _float_tol(value: float) -> float:
    """Rounding of a sum of O(100) terms: 1e3 ulps of the larger magnitude (not statistical)."""
    return 1e3 * torch.finfo(torch.get_default_dtype()).eps * max(1.0, abs(value))


# --- models -----------------------------------------------------------------------------------

K = 2


@config_enumerate
def mixture_model(data: Tensor) -> None:
    """Gaussian mixture: global reparameterized locs, enumerated assignments in the data plate."""
    locs = pyro.sample("locs", dist.Normal(0.0, 10.0).expand([K]).to_event(1))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(data.new_tensor([0.4, 0.6])))
        pyro.sample("obs", dist.Normal(Vindex(locs)[..., assignment], 1.0), obs=data)


def mixture_guide(data: Tensor) -> None:
    loc = pyro.param("locs_loc", lambda: data.new_tensor([-1.0, 1.0]))
    scale = pyro.param("locs_scale", lambda: data.new_full((K,), 0.5), constraint=dist.constraints.positive)
    pyro.sample("locs", dist.Normal(loc, scale).to_event(1))


def mixture_data() -> Tensor:
    gen = torch.Generator().manual_seed(8)
    dtype = torch.get_default_dtype()
    return torch.cat([torch.randn(6, generator=gen) - 3.0, torch.randn(6, generator=gen) + 3.0]).to(dtype)


HIDDEN = 3


def hmm_model(seqs: Tensor) -> None:
    """examples/hmm.py's model_1 over sequences, written with Vindex so particles broadcast."""
    num_seqs, length, dim = seqs.shape
    eye = torch.eye(HIDDEN, dtype=seqs.dtype)
    probs_x = pyro.sample("probs_x", dist.Dirichlet(0.9 * eye + 0.1).to_event(1))
    probs_y = pyro.sample("probs_y", dist.Beta(seqs.new_tensor(1.0), 1.0).expand([HIDDEN, dim]).to_event(2))
    tones = pyro.plate("tones", dim, dim=-1)
    with pyro.plate("sequences", num_seqs, dim=-2):
        x: Any = 0
        for t in pyro.markov(range(length)):
            x = pyro.sample(f"x_{t}", dist.Categorical(Vindex(probs_x)[..., x, :]), infer={"enumerate": "parallel"})
            with tones:
                probs = Vindex(probs_y)[..., x, torch.arange(dim)]
                pyro.sample(f"y_{t}", dist.Bernoulli(probs), obs=seqs[:, t])


def hmm_guide(seqs: Tensor) -> None:
    positive = dist.constraints.positive
    conc_x = pyro.param("conc_x", lambda: torch.full((HIDDEN, HIDDEN), 2.0, dtype=seqs.dtype), constraint=positive)
    pyro.sample("probs_x", dist.Dirichlet(conc_x).to_event(1))
    shape = (HIDDEN, seqs.shape[-1])
    a = pyro.param("a_y", lambda: torch.full(shape, 2.0, dtype=seqs.dtype), constraint=positive)
    b = pyro.param("b_y", lambda: torch.full(shape, 3.0, dtype=seqs.dtype), constraint=positive)
    pyro.sample("probs_y", dist.Beta(a, b).to_event(2))


def hmm_data() -> Tensor:
    gen = torch.Generator().manual_seed(9)
    return torch.bernoulli(torch.full((4, 6, 3), 0.4), generator=gen).to(torch.get_default_dtype())


# --- the functions, called directly -------------------------------------------------------------


def _direct_log_w(model: Any, guide: Any, args: tuple[Any, ...], num_particles: int, nesting: int) -> Tensor:
    """``[S]`` log-weights with the enumerated sites summed out, via :mod:`pyro_elbo._pyro.enum`."""
    model_trace, guide_trace = traces(model, guide, args, {}, num_particles, nesting, False)
    assert enum.enumerated_sites(model_trace, guide_trace)
    plated = particle_plated(model, num_particles, -nesting - 1)
    enum_trace = enum.enumerated_trace(plated, guide_trace, args, {}, nesting)
    reducer = Reducer(nesting, num_particles, (), 1.0)
    aligned, absorbed = enum.aligned_log_p(enum_trace, guide_trace, reducer)
    assert absorbed and any(key.startswith(enum.MARGINAL_PREFIX) for key in aligned)
    log_p = reducer.total(reducer.reduce(t) for t in aligned.values())
    log_q = reducer.total(reducer(site) for site in scored_sites(guide_trace))
    return (log_p - log_q).detach()


CASES = {
    "mixture": (mixture_model, mixture_guide, mixture_data, 1),
    "hmm": (hmm_model, hmm_guide, hmm_data, 2),
}


def _traceenum_loss(case: str, num_particles: int, seed: int) -> float:
    model, guide, data, nesting = CASES[case]
    elbo = TraceEnum_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=nesting)
    pyro.set_rng_seed(seed)
    return elbo.loss(model, guide, data())


@pytest.mark.parametrize("num_particles", [1, 5])
@pytest.mark.parametrize("case", CASES)
def test_enum_functions_match_traceenum(case: str, num_particles: int) -> None:
    model, guide, data, nesting = CASES[case]
    _traceenum_loss(case, num_particles, 0)  # create the guide's parameters
    pyro.set_rng_seed(1)
    ours = -float(_direct_log_w(model, guide, (data(),), num_particles, nesting).mean())
    theirs = _traceenum_loss(case, num_particles, 1)
    assert abs(ours - theirs) <= _float_tol(theirs), (ours, theirs)


def test_markov_contraction_is_linear_in_length() -> None:
    """The HMM is contracted along the chain, not over all K^T paths: the enumerated trace's
    enumeration dims are reused (pyro.markov), so 2 dims serve any length."""
    seqs = torch.bernoulli(torch.full((2, 30, 3), 0.5))
    hmm_guide(seqs)
    model_trace, guide_trace = traces(hmm_model, hmm_guide, (seqs,), {}, 1, 2, False)
    enum_trace = enum.enumerated_trace(hmm_model, guide_trace, (seqs,), {}, 2)
    dims = {
        site["infer"]["_enumerate_dim"]
        for site in enum_trace.nodes.values()
        if site["type"] == "sample" and site["infer"].get("_enumerate_dim") is not None
    }
    assert dims == {-4, -5}
    aligned, absorbed = enum.aligned_log_p(enum_trace, guide_trace, Reducer(2, 1, (), 1.0))
    assert len(absorbed) == 60 and all(torch.isfinite(t).all() for t in aligned.values())


def test_guide_side_enumeration_is_refused_by_name() -> None:
    data = mixture_data()

    def guide(data: Tensor) -> None:
        mixture_guide(data)
        with pyro.plate("data", len(data)):
            pyro.sample("assignment", dist.Categorical(logits=data.new_zeros(K)), infer={"enumerate": "parallel"})

    model_trace, guide_trace = traces(mixture_model, guide, (data,), {}, 1, 1, False)
    with pytest.raises(NotImplementedError, match="Guide site 'assignment'"):
        enum.enumerated_sites(model_trace, guide_trace)


def test_discrete_posterior_matches_exact_responsibilities() -> None:
    """infer_discrete given the locs: each point's assignment ~ its exact responsibility.

    4000 draws per point; the count of a point's assignment=1 is Binomial(4000, r), so a 5-sigma
    band has a two-sided false-alarm rate of 6e-7 per point (12 points: < 1e-5)."""
    data = mixture_data()
    mixture_guide(data)
    num = 4000
    _, guide_trace = traces(mixture_model, mixture_guide, (data,), {}, num, 1, False)
    plated = particle_plated(mixture_model, num, -2)
    draws = enum.discrete_posterior(plated, guide_trace, (data,), {}, 1)
    assignment = draws["assignment"].reshape(num, len(data))
    locs = guide_trace.nodes["locs"]["value"].reshape(num, K)
    log_r = torch.log(data.new_tensor([0.4, 0.6])) + dist.Normal(locs.unsqueeze(1), 1.0).log_prob(data[:, None])
    resp = torch.softmax(log_r, -1)[..., 1]  # [S, N] exact P(assignment=1 | x, locs_s)
    expected = resp.sum(0)
    sd = (resp * (1 - resp)).sum(0).sqrt()
    assert ((assignment.sum(0) - expected).abs() <= 5 * sd + 1e-9).all()


# --- exact log p(x) by brute force --------------------------------------------------------------

OFFSETS = (-2.0, 2.0)
WEIGHTS = (0.3, 0.7)
SIGMA = 0.7


def offset_model(data: Tensor) -> None:
    """x_i = mu + c[z_i] + noise: mu ~ N(0, 1), z_i ~ Cat(w) summed out."""
    mu = pyro.sample("mu", dist.Normal(data.new_tensor(0.0), 1.0))
    with pyro.plate("data", len(data)):
        z = pyro.sample("z", dist.Categorical(data.new_tensor(WEIGHTS)), infer={"enumerate": "parallel"})
        pyro.sample("obs", dist.Normal(mu + data.new_tensor(OFFSETS)[z], SIGMA), obs=data)


def offset_data() -> Tensor:
    return torch.tensor([-2.3, 1.1, 2.4, -0.2])


def _brute_force(data: Tensor) -> tuple[float, Tensor, Tensor, float]:
    """log p(x) and the exact posterior of mu (a mixture over the 2^N assignments)."""
    n = len(data)
    cov = SIGMA**2 * torch.eye(n) + torch.ones(n, n)
    var = 1.0 / (1.0 + n / SIGMA**2)
    log_joint, means = [], []
    for z in itertools.product(range(K), repeat=n):
        shift = torch.tensor([OFFSETS[k] for k in z])
        prior = sum(math.log(WEIGHTS[k]) for k in z)
        log_joint.append(prior + dist.MultivariateNormal(shift, cov).log_prob(data))
        means.append(var * float((data - shift).sum()) / SIGMA**2)
    log_joint_t = torch.stack(log_joint)
    log_px = float(torch.logsumexp(log_joint_t, 0))
    return log_px, torch.softmax(log_joint_t, 0), torch.tensor(means), var


@functools.cache
def _posterior(dtype: torch.dtype) -> tuple[float, Tensor, Tensor, float]:
    return _brute_force(offset_data().to(dtype))


def _posterior_guide(data: Tensor) -> None:
    """q(mu) = p(mu | x) exactly, for ``offset_data()``."""
    _, probs, means, var = _posterior(data.dtype)
    pyro.sample("mu", dist.MixtureSameFamily(dist.Categorical(probs), dist.Normal(means, math.sqrt(var))))


def test_exact_guide_gives_log_px_on_every_particle() -> None:
    """With q(mu) = p(mu | x), log w = log p(x) for every draw: no Monte Carlo error at all."""
    data = offset_data()
    log_px, *_ = _brute_force(data)
    log_w = _direct_log_w(offset_model, _posterior_guide, (data,), 64, 1)
    assert (log_w - log_px).abs().max() <= _float_tol(log_px), (log_w, log_px)


@needs_wiring
def test_kl_gap_exact_guide_brackets_log_px() -> None:
    data = offset_data()
    log_px, *_ = _brute_force(data)
    report = pyro_elbo.kl_gap(offset_model, _posterior_guide, data, num_particles=64, per_site=False)
    assert abs(report.elbo.value - log_px) <= _float_tol(log_px)
    assert all(abs(e.value - log_px) <= _float_tol(log_px) for e in report.iwae.values())


@needs_wiring
def test_iwae_estimate_of_log_px() -> None:
    """A wider Normal guide: mean of w is unbiased for p(x) with bounded weights (q's variance
    exceeds every posterior component's). With S = 4000 draws, log mean w is within 4 delta-method
    standard errors of log p(x) except with probability 6e-5 (normal approximation; the -se^2/2
    bias is < 1e-3 se here)."""
    data = offset_data()
    log_px, probs, means, var = _brute_force(data)
    center = float((probs * means).sum())
    spread = 1.5 * math.sqrt(var + float((probs * (means - center) ** 2).sum()))  # 1.5 posterior sds

    def guide(data: Tensor) -> None:
        pyro.sample("mu", dist.Normal(data.new_tensor(center), spread))

    lw = pyro_elbo.log_weights(offset_model, guide, data, num_particles=4000)
    w = torch.exp(lw.log_w - lw.log_w.max())
    se = float(w.std() / w.mean()) / math.sqrt(4000)
    estimate = -pyro_elbo.IWAE(num_particles=4000).loss(offset_model, guide, data)
    assert abs(estimate - log_px) <= 4 * se + _float_tol(log_px), (estimate, log_px, se)
    assert se < 0.05  # the test has power: a missing log-factor of the enumeration is O(1)


# --- the public objectives ----------------------------------------------------------------------


@needs_wiring
@pytest.mark.parametrize("num_particles", [1, 5])
@pytest.mark.parametrize("case", CASES)
def test_elbo_equals_traceenum(case: str, num_particles: int) -> None:
    model, guide, data, nesting = CASES[case]
    _traceenum_loss(case, num_particles, 0)
    pyro.set_rng_seed(1)
    ours = pyro_elbo.ELBO(num_particles=num_particles).loss(model, guide, data())
    theirs = _traceenum_loss(case, num_particles, 1)
    assert abs(ours - theirs) <= _float_tol(theirs), (ours, theirs)


@needs_wiring
@pytest.mark.parametrize("case", CASES)
def test_elbo_gradient_equals_traceenum(case: str) -> None:
    """Reparameterized guide: the gradients agree on the same draws too."""
    model, guide, data, nesting = CASES[case]
    _traceenum_loss(case, 3, 0)
    params = [p.unconstrained() for p in pyro.get_param_store().values()]
    pyro.set_rng_seed(1)
    ours = torch.autograd.grad(pyro_elbo.ELBO(num_particles=3).differentiable_loss(model, guide, data()), params)
    pyro.set_rng_seed(1)
    elbo = TraceEnum_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=nesting)
    theirs = torch.autograd.grad(elbo.differentiable_loss(model, guide, data()), params)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9), (a, b)


@needs_wiring
@pytest.mark.parametrize("objective", ["IWAE", "DReG", "VIMCO", "STL", "RenyiELBO"])
def test_multi_particle_objectives_run_on_the_mixture(objective: str) -> None:
    """Each objective: finite loss, finite nonzero gradients, and on the same draws the IWAE-type
    bound is at least the ELBO (Jensen, holds draw by draw)."""
    data = mixture_data()
    mixture_guide(data)
    params = [p.unconstrained() for p in pyro.get_param_store().values()]
    obj = getattr(pyro_elbo, objective)(num_particles=6)
    pyro.set_rng_seed(3)
    loss = obj.differentiable_loss(mixture_model, mixture_guide, data)
    grads = torch.autograd.grad(loss, params)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    pyro.set_rng_seed(3)
    elbo = pyro_elbo.ELBO(num_particles=6).loss(mixture_model, mixture_guide, data)
    pyro.set_rng_seed(3)
    iwae = pyro_elbo.IWAE(num_particles=6).loss(mixture_model, mixture_guide, data)
    assert -iwae >= -elbo - _float_tol(elbo)


def test_site_share_counts_the_enumerated_marginal_once() -> None:
    data = mixture_data()
    mixture_guide(data)
    model_trace, guide_trace = traces(mixture_model, mixture_guide, (data,), {}, 3, 1, False)
    enum_trace = enum.enumerated_trace(particle_plated(mixture_model, 3, -2), guide_trace, (data,), {}, 1)
    reducer = Reducer(1, 3, (), 1.0)
    aligned, absorbed = enum.aligned_log_p(enum_trace, guide_trace, reducer)
    assert set(absorbed) == {"assignment", "obs"}
    site_log_p = {k: reducer.reduce(t) for k, t in aligned.items()}
    site_log_q = {"locs": reducer(guide_trace.nodes["locs"])}
    share = enum.site_share(site_log_p, site_log_q, "locs", ["assignment", "obs"])
    assert share is not None
    assert torch.allclose(share, sum(site_log_p.values()) - site_log_q["locs"])
    assert enum.site_share(site_log_p, site_log_q, "assignment", ["obs"]) is None
