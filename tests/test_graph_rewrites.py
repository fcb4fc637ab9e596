"""``outer_contractions_as_matmul``: which sums of products become ``mm``, and that the rewritten graph
computes the same values up to float32 rounding. ``linalg_errors_as_nan``: a failed factorization
gives NaN instead of raising, a good one the same factor. ``standard_normals_as_randn``: the
draws of ``torch.distributions`` become ``randn``."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from torch.fx.experimental.proxy_tensor import make_fx

from pyro_elbo.compile.rewrites import (
    CHUNK,
    MIN_CONTRACTED,
    constant_masks_as_indices,
    linalg_errors_as_nan,
    outer_contractions_as_matmul,
    standard_normals_as_randn,
)

aten = torch.ops.aten


def _traced(fn: Callable[..., Tensor], *args: Tensor) -> torch.fx.GraphModule:
    """``fn`` as an aten graph with fake-tensor metadata (what the captured training step has)."""
    return make_fx(fn, tracing_mode="fake")(*args)


def _targets(graph: torch.fx.GraphModule) -> list[object]:
    return [node.target for node in graph.graph.nodes]


def _assert_same_sum(rewritten: Tensor, original: Tensor, abs_sum: Tensor, k: int) -> None:
    """Equal up to float32 rounding. Deterministic bound, not statistical: two float32 sums of the
    same k products (``abs_sum``: the sum of their absolute values) each differ from the exact sum
    by at most gamma_k * abs_sum, gamma_k = k u / (1 - k u), u = 2^-24 (Higham, Accuracy and
    Stability of Numerical Algorithms, eq. 3.5 and the bound on recursive summation)."""
    u = 2.0**-24
    bound = 2 * k * u / (1 - k * u) * abs_sum.double()
    assert rewritten.shape == original.shape
    assert ((rewritten.double() - original.double()).abs() <= bound).all()


def test_gradient_of_a_linear_predictor_becomes_one_mm() -> None:
    """The backward of ``(x * w).sum(-1)`` sums ``r_i x_ij`` over rows: rewritten; the forward sum
    over the innermost dimension is left to inductor."""
    n, d = MIN_CONTRACTED + 903, 20
    x, w, y = torch.randn(n, d), torch.randn(d), torch.bernoulli(torch.full((n,), 0.5))

    def grad_of_w(x: Tensor, w: Tensor, y: Tensor) -> Tensor:
        w = w.detach().requires_grad_()
        logits = (x * w).sum(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, [w])
        return grad

    graph = _traced(grad_of_w, x, w, y)
    original = graph(x, w, y)
    assert outer_contractions_as_matmul(graph) == 1
    assert _targets(graph).count(aten.mm.default) == 1
    assert _targets(graph).count(aten.sum.dim_IntList) == 1  # the forward's innermost sum stays
    residual = torch.sigmoid(x @ w) - y
    _assert_same_sum(graph(x, w, y), original, residual.abs() @ x.abs(), n)
    torch.testing.assert_close(graph(x, w, y), grad_of_w(x, w, y), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("keepdim", [False, True])
def test_outer_product_sum_keeps_the_result_layout(keepdim: bool) -> None:
    """``sum_k b_kj a_ki`` with the factors in the order that needs a transpose of the mm."""
    k = MIN_CONTRACTED
    a, b = torch.randn(k, 7), torch.randn(k, 9)

    def fn(a: Tensor, b: Tensor) -> Tensor:
        return (b[:, None, :] * a[:, :, None]).sum(0, keepdim=keepdim)

    graph = _traced(fn, a, b)
    original = graph(a, b)
    assert outer_contractions_as_matmul(graph) == 1
    assert aten.mm.default in _targets(graph) and aten.sum.dim_IntList not in _targets(graph)
    _assert_same_sum(graph(a, b), original, (b[:, None, :] * a[:, :, None]).abs().sum(0, keepdim=keepdim), k)


@pytest.mark.parametrize("rest", [0, 5])
def test_long_sums_are_chunked_like_inductors_cascade(rest: int) -> None:
    """Over ``2 * CHUNK`` summed products, one GEMM would sum them all in order (error growing like
    k u); the rewrite sums chunks of ``CHUNK`` by ``bmm`` and adds the partial sums, plus one
    ``mm`` for the ``rest``."""
    k = 3 * CHUNK + rest
    r, x = torch.rand(k), torch.randn(k, 3) + 1.0

    def fn(r: Tensor, x: Tensor) -> Tensor:
        return (r[:, None] * x).sum(0)

    graph = _traced(fn, r, x)
    assert outer_contractions_as_matmul(graph) == 1
    products = [n for n in graph.graph.nodes if n.target in (aten.mm.default, aten.bmm.default)]
    summed = [n.args[1].meta["val"].shape[-2] for n in products]  # the k extent of each GEMM
    assert sorted(summed) == sorted([CHUNK] + ([rest] if rest else []))
    exact = r.double() @ x.double()
    _assert_same_sum(graph(r, x), exact.float(), r.abs() @ x.abs(), CHUNK + 4)


def _unchanged(fn: Callable[..., Tensor], *args: Tensor) -> None:
    graph = _traced(fn, *args)
    code = graph.code
    assert outer_contractions_as_matmul(graph) == 0
    assert graph.code == code


def test_left_to_inductor() -> None:
    k = MIN_CONTRACTED
    x, r = torch.randn(k, 20), torch.randn(k)
    _unchanged(lambda x, w: (x * w).sum(-1), x.T.contiguous(), r)  # innermost dimension summed
    _unchanged(lambda r, x: (r[:-1, None] * x[:-1]).sum(0), r, x)  # fewer than MIN_CONTRACTED summed
    _unchanged(lambda x: (x * x).sum(0), x)  # a kept dimension in both factors (batch)
    _unchanged(lambda r, x: (r[:, None] * x).sum([0, 1]), r, x)  # dimension 1 summed, only in x
    _unchanged(lambda r, x: (r[:, None] * x).sum(0, dtype=torch.float64), r, x)  # a dtype change
    ints = torch.randint(0, 3, (k, 20))
    _unchanged(lambda r, x: (r[:, None] * x).sum(0), ints[:, 0], ints)  # not floating point


def test_a_failed_cholesky_gives_nan_in_the_graph_instead_of_raising() -> None:
    """The check with side effects is gone (inductor can cache the graph), a positive-definite
    batch factors exactly as before, and the matrix whose factorization fails gets NaN, only it
    (per matrix, as ``info`` is), and its gradient path stays finite elsewhere."""

    def loss(a: Tensor) -> Tensor:
        return torch.linalg.cholesky(a).diagonal(dim1=-2, dim2=-1).log()

    good = torch.eye(3) * 2.0 + 0.5
    bad = torch.tensor([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # eigenvalue -1
    graph = _traced(loss, torch.stack([good, good]))
    assert aten._linalg_check_errors.default in _targets(graph)
    assert linalg_errors_as_nan(graph) == 1
    assert aten._linalg_check_errors.default not in _targets(graph)
    assert torch.equal(graph(torch.stack([good, good])), loss(torch.stack([good, good])))
    with pytest.raises(torch.linalg.LinAlgError):
        loss(torch.stack([good, bad]))
    out = graph(torch.stack([good, bad]))
    assert torch.equal(out[0], loss(good)) and out[1].isnan().all()


def test_a_constant_boolean_mask_becomes_its_integer_positions() -> None:
    """``w[mask]`` with a constant mask (a module's mask buffer, as in BNAF) and its gradient
    (an ``index_put`` with the same mask): after the rewrite no index is boolean, so the shapes are
    static, and the values and gradient are exactly the eager ones."""
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])  # a float buffer, converted as BNAF does

    def step(w: Tensor) -> tuple[Tensor, Tensor]:
        loss = (w[mask.bool()] ** 2 * torch.arange(4.0)).sum()
        (grad,) = torch.autograd.grad(loss, [w])
        return loss, grad

    w = torch.randn(2, 3)
    graph = make_fx(step, tracing_mode="fake", _allow_non_fake_inputs=True)(w.clone().requires_grad_(True))
    assert constant_masks_as_indices(graph) >= 1
    for node in graph.graph.nodes:
        if node.target in (aten.index.Tensor, aten.index_put.default, aten._unsafe_index_put.default):
            assert all(i is None or i.meta["val"].dtype != torch.bool for i in node.args[1])
    loss, grad = graph(w.clone().requires_grad_(True))
    expected_loss, expected_grad = step(w.clone().requires_grad_(True))
    assert torch.equal(loss, expected_loss) and torch.equal(grad, expected_grad)


def test_standard_normal_draws_become_randn() -> None:
    """``Normal(loc, scale).rsample()`` draws through ``empty(shape).normal_()``: rewritten into one
    ``randn`` of the same shape and dtype; the draws stay standard normals (mean and variance within
    5 standard errors: a false alarm rate below 1e-6 per check)."""

    def draw(loc: Tensor) -> Tensor:
        return torch.distributions.Normal(loc, 1.0, validate_args=False).rsample()

    loc = torch.zeros(20_000, dtype=torch.float64)
    graph = _traced(draw, loc)
    assert aten.normal_.default in _targets(graph)
    assert standard_normals_as_randn(graph) == 1
    targets = _targets(graph)
    assert aten.normal_.default not in targets and aten.empty.memory_format not in targets
    assert aten.randn.default in targets
    sample = graph(loc)
    assert sample.shape == loc.shape and sample.dtype == torch.float64
    n = sample.numel()
    assert abs(sample.mean().item()) < 5 / n**0.5  # var of the mean: 1/n
    assert abs(sample.var().item() - 1) < 5 * (2 / n) ** 0.5  # var of the variance: ~2/n
    assert standard_normals_as_randn(graph) == 0
