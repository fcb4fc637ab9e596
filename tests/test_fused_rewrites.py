"""``logit_losses_share_exp`` and ``small_operands_computed_once``: on the loss-and-gradient graphs
of several models (the training step's shape: a reparameterized mean-field draw, the model's
log-density, the guide's, and the gradient of their difference), each rewrite fires where it
should, leaves the others alone, and gives the same loss and gradients as the graph it rewrote, up
to float32 rounding."""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import Tensor
from torch.fx.experimental.proxy_tensor import make_fx

import pyro_elbo
import pyro_elbo.compile.graph as C
from pyro_elbo.compile.fused_rewrites import FUSED_REWRITES, logit_losses_share_exp, small_operands_computed_once

aten = torch.ops.aten

Rewrite = Callable[[torch.fx.GraphModule], int]
#: float32's unit roundoff
U = 2.0**-24


@pytest.fixture(autouse=True)
def _no_validation() -> object:
    """Traced with fake tensors: the distributions' support checks would branch on data."""
    with pyro.validation_enabled(False):
        yield


def _draw(loc: Tensor, raw_scale: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """An AutoNormal-style reparameterized draw and its scale."""
    scale = torch.nn.functional.softplus(raw_scale)
    return loc + scale * eps, scale


def _step(log_likelihood: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Callable[..., tuple[Tensor, ...]]:
    """Negative single-draw ELBO of a model with a standard normal prior on its latent vector,
    and its gradient with respect to the guide's parameters."""

    def step(loc: Tensor, raw_scale: Tensor, eps: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        loc, raw_scale = loc.detach().requires_grad_(), raw_scale.detach().requires_grad_()
        z, scale = _draw(loc, raw_scale, eps)
        log_p = dist.Normal(torch.zeros_like(z), 1.0).log_prob(z).sum() + log_likelihood(z, x, y)
        log_q = dist.Normal(loc, scale).log_prob(z).sum()
        loss = log_q - log_p
        grads = torch.autograd.grad(loss, [loc, raw_scale])
        return (loss, *grads)

    return step


def logistic(z: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Bayesian logistic regression, the linear predictor written as Pyro models write it."""
    w, b = z[:-1], z[-1]
    return dist.Bernoulli(logits=(x * w).sum(-1) + b).log_prob(y).sum()


def logistic_matmul(z: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """The same written with ``@`` (no broadcast product: only the shared exponential applies)."""
    return dist.Bernoulli(logits=x @ z[:-1] + z[-1]).log_prob(y).sum()


def multi_output(z: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Several binary outputs per point: a ``D x K`` weight matrix, logits ``N x K``."""
    weights = z.reshape(x.shape[-1], y.shape[-1])
    return dist.Bernoulli(logits=(x[:, :, None] * weights).sum(1)).log_prob(y).sum()


def grouped_intercepts(z: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Logistic regression with one intercept per group (the last ``G`` latents), indexed per point."""
    d = x.shape[-1]
    groups = torch.arange(x.shape[0]) % (z.shape[0] - d)
    return dist.Bernoulli(logits=(x * z[:d]).sum(-1) + z[d:][groups]).log_prob(y).sum()


def linear_gaussian(z: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Linear regression with a Normal likelihood (0/1 responses will do; no Bernoulli: only the
    stored operand applies)."""
    return dist.Normal((x * z).sum(-1), 0.5).log_prob(y).sum()


def weighted_logistic(z: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """A class-weighted logistic loss (``pos_weight``): not the form the exponential is shared in."""
    logits = (x * z).sum(-1)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, y, pos_weight=torch.tensor(2.0), reduction="none"
    )
    return -loss.sum()


#: name: (log-likelihood, N, D, latents, outputs per point, rewrites expected from each)
MODELS = {
    "logistic": (logistic, 5000, 20, 21, 0, {"shared": 1, "stored": 1}),
    "logistic, x @ w": (logistic_matmul, 3000, 20, 21, 0, {"shared": 1, "stored": 0}),
    "multi-output": (multi_output, 2000, 7, 21, 3, {"shared": 1, "stored": 1}),
    "grouped intercepts": (grouped_intercepts, 3000, 7, 12, 0, {"shared": 1, "stored": 1}),
    "linear Gaussian": (linear_gaussian, 4000, 9, 9, 0, {"shared": 0, "stored": 1}),
    "weighted logistic": (weighted_logistic, 4000, 9, 9, 0, {"shared": 0, "stored": 1}),
}
REWRITES: dict[str, Rewrite] = {"shared": logit_losses_share_exp, "stored": small_operands_computed_once}
REWRITE_NAMES = [(name, rewrite) for name, rewrite, _, _ in FUSED_REWRITES]


def _inputs(n: int, d: int, latents: int, outputs: int, dtype: torch.dtype) -> tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(n + d)
    loc = 0.3 * torch.randn(latents, generator=gen)
    raw_scale = torch.randn(latents, generator=gen) - 2.0
    eps = torch.randn(latents, generator=gen)
    x = torch.randn(n, d, generator=gen)
    y = torch.bernoulli(torch.full((n, outputs) if outputs else (n,), 0.4), generator=gen)
    return tuple(t.to(dtype) for t in (loc, raw_scale, eps, x, y))


def _assert_rounding_close(rewritten: Tensor, original: Tensor, exact: Tensor) -> None:
    """``rewritten`` is as close to the float64 value ``exact`` as the original float32 graph, up
    to a few ulps: a rewrite that only reorders float32 operations moves each element by about as
    much as the original's own rounding error; one that changed the math moves it by O(1)."""
    own_error = (original.double() - exact).abs()
    bound = 4 * own_error + 64 * U * exact.abs().max()
    assert ((rewritten.double() - exact).abs() <= bound).all(), (rewritten, original, exact)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("which", list(REWRITES))
def test_each_rewrite_keeps_loss_and_gradients(model: str, which: str) -> None:
    log_likelihood, n, d, latents, outputs, expected = MODELS[model]
    step = _step(log_likelihood)
    inputs = _inputs(n, d, latents, outputs, torch.float32)
    graph = make_fx(step, tracing_mode="fake")(*inputs)
    original = graph(*inputs)
    assert REWRITES[which](graph) == expected[which]
    rewritten = graph(*inputs)
    exact = step(*(t.double() for t in inputs))
    assert len(rewritten) == len(original) == 3
    for new, old, truth in zip(rewritten, original, exact):
        assert new.dtype == old.dtype == torch.float32
        _assert_rounding_close(new, old, truth)


def test_all_rewrites_together_on_logistic_regression() -> None:
    """In the compiled path's order, on the step the benchmark measures."""
    step = _step(logistic)
    inputs = _inputs(5000, 20, 21, 0, torch.float32)
    graph = make_fx(step, tracing_mode="fake")(*inputs)
    original = graph(*inputs)
    counts = [rewrite(graph) for _, rewrite, _, _ in FUSED_REWRITES]
    assert counts == [1, 1]
    targets = [node.target for node in graph.graph.nodes]
    assert aten.sigmoid.default not in targets and aten.binary_cross_entropy_with_logits.default not in targets
    assert targets.count(aten.exp.default) == 1  # (the draw's scale is aten.softplus)
    exact = step(*(t.double() for t in inputs))
    for new, old, truth in zip(graph(*inputs), original, exact):
        _assert_rounding_close(new, old, truth)


def test_sigmoid_from_the_shared_exponential_at_extreme_logits() -> None:
    """Where ``exp(-z)`` overflows (z << 0) the shared form keeps ``t / (1 + t)``; both branches
    agree with ``torch.sigmoid`` to float32 rounding wherever it is representable."""
    z = torch.tensor([-120.0, -90.0, -30.0, -1.0, -1e-3, 0.0, 1e-3, 1.0, 30.0, 90.0, 120.0])
    y = torch.tensor([0.0, 1.0] * 5 + [0.0])

    def loss_and_sigmoid(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none"), torch.sigmoid(z)

    graph = make_fx(loss_and_sigmoid, tracing_mode="fake")(z, y)
    assert logit_losses_share_exp(graph) == 1
    loss, sigmoid = graph(z, y)
    torch.testing.assert_close(loss, loss_and_sigmoid(z, y)[0], rtol=2 * U, atol=0.0)
    exact = torch.sigmoid(z.double())
    assert ((sigmoid.double() - exact).abs() <= 2 * U * exact).all()


def test_the_compiled_step_applies_them_and_equals_eager() -> None:
    """Through inductor: a MAP logistic regression whose coefficients are computed from two
    parameters (so both rewrites fire), D = 7 (not a multiple of the vector width), no random
    draws, so the compiled loss and gradients must equal eager's to float32 rounding."""
    pyro.clear_param_store()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 7, generator=gen)
    y = torch.bernoulli(torch.full((1000,), 0.3), generator=gen)

    def model(x: Tensor, y: Tensor) -> None:
        w = pyro.sample("w", dist.Normal(torch.zeros(7), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Bernoulli(logits=(x * w).sum(-1)), obs=y)

    def guide(x: Tensor, y: Tensor) -> None:
        loc = pyro.param("loc", 0.1 * torch.arange(7.0))
        gain = pyro.param("gain", torch.full((7,), 1.5), constraint=dist.constraints.positive)
        pyro.sample("w", dist.Delta(loc * gain).to_event(1))

    objective = pyro_elbo.ELBO()
    objective.loss(model, guide, x, y)  # create the parameters
    store = pyro.get_param_store()
    params = {name: store._params[name] for name in store.keys()}
    counts: dict[str, int] = {}

    def counting(name: str, rewrite: Rewrite) -> Rewrite:
        def run(graph: torch.fx.GraphModule) -> int:
            counts[name] = rewrite(graph)
            return counts[name]

        return run

    table = [
        (n, counting(n, f), a, lost) if n in dict(REWRITE_NAMES) else (n, f, a, lost) for n, f, a, lost in C._REWRITES
    ]
    with pyro.validation_enabled(False), pytest.MonkeyPatch.context() as patch:
        patch.setattr(C, "_REWRITES", tuple(table))
        loss, finite, grads = C.CompiledLoss(objective, model, guide, backend="inductor")(params, (x, y), {})
    assert counts == {"logit_losses_share_exp": 1, "small_operands_computed_once": 1}
    eager = objective.differentiable_loss(model, guide, x, y)
    eager_grads = torch.autograd.grad(eager, list(params.values()))
    exact = objective.differentiable_loss(model, guide, x.double(), y.double())
    assert bool(finite)
    _assert_rounding_close(loss, eager.detach(), exact.detach())
    # each gradient is a float32 sum over the 1000 points of r_i x_ij times a chain-rule factor
    # (loc, gain): two such sums differ by at most 2 n u times the sum of absolute terms (Higham)
    w = (params["loc"] * store["gain"]).detach()
    terms = (torch.sigmoid(x @ w) - y).abs() @ x.abs()
    factor = (1 + store["gain"].detach().max()) * (1 + params["loc"].detach().abs().max())
    bound = 2 * 1000 * U * float(terms.max() * factor) + 1e-6
    for g, e in zip(grads, eager_grads):
        assert (g - e).abs().max() <= bound


def test_an_operand_written_in_place_or_without_inductors_operation_is_left_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x, loc, scale = torch.randn(5000, 20), torch.randn(20), torch.rand(20)

    def written_through_a_view(x: Tensor, loc: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        w = loc * scale
        first = (x * w).sum(-1)
        w[:5].add_(1.0)  # the second product reads the written values through w itself
        return first, (x * w).sum(-1)

    graph = make_fx(written_through_a_view, tracing_mode="fake")(x, loc, scale)
    assert small_operands_computed_once(graph) == 0
    torch.testing.assert_close(graph(x, loc, scale), written_through_a_view(x, loc, scale))

    def product(x: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
        return (x * (loc * scale)).sum(-1)

    graph = make_fx(product, tracing_mode="fake")(x, loc, scale)
    monkeypatch.setattr("pyro_elbo.compile.fused_rewrites._force_stride_order", lambda: None)
    assert small_operands_computed_once(graph) == 0
    monkeypatch.undo()
    assert small_operands_computed_once(graph) == 1
