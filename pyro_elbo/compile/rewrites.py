"""Rewrites of a captured training step's FX graph before inductor compiles it.

:func:`standard_normals_as_randn` turns ``torch.empty(shape).normal_()`` (how
``torch.distributions`` draws standard normals) into ``torch.randn(shape)``, which inductor
generates inside its fused kernel instead of one library call per sample site.

:func:`constant_masks_as_indices` turns indexing with a constant boolean mask (BNAF's masked
weights, ``w[mask]``) into indexing with the mask's constant integer positions: a boolean mask's
result has a data-dependent shape, which inductor's ``compile_fx`` refused, so such models
compiled through ``torch.compile`` without the on-disk caches.

:func:`linalg_errors_as_nan` replaces the error checks of ``torch.linalg`` (a failed Cholesky
raises) by NaN outputs, which the step's non-finite guard refuses like any other non-finite step;
as checks with side effects they kept inductor from caching the graph at all.

:func:`outer_contractions_as_matmul` turns a sum over an outer dimension of a broadcast product,
``(a * b).sum(dims)`` with every summed dimension present in both factors, into a matrix product.
The backward pass of ``(x * w).sum(-1)`` (the way Pyro models write a linear predictor) is such a
sum: the gradient of ``w`` is :math:`\\sum_i r_i x_{ij}`, i.e. :math:`r^\\top X`, a reduction over
the rows of ``X``. Inductor's C++ backend generates it as one pass over all rows per 8-wide
column block, each accumulating through a cascade-sum helper (its accumulator in heap memory when
there are more than 4096 rows) and a masked tail block; a GEMM reads ``X`` once. Sums over the
innermost dimension (the forward ``x @ w`` written as ``(x * w).sum(-1)``) are left to inductor,
which vectorizes along the summed dimension and fuses them with their neighbours. Measurements
are in ``benchmarks/README.md``.

The result differs from the fused reduction only by float32 rounding: up to 8192 summed products
the GEMM sums them in order, as inductor's cascade sum does at that length; beyond, the sum is
chunked like the cascade (:func:`_chunked_mm`). Measured accuracy is in ``benchmarks/README.md``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pyro_elbo.compile.torch_internals import fake_mode_of, is_fake

aten = torch.ops.aten


def _overload(name: str, overload: str = "default") -> Any:
    """``aten.<name>.<overload>``, or ``None`` where this torch has no such operation (the private
    ones, ``_linalg_check_errors`` and the like, may be renamed by a release: the rewrites that
    look for them then find nothing to rewrite)."""
    packet = getattr(aten, name, None)
    return None if packet is None else getattr(packet, overload, None)


#: the fewest summed elements per output for which a contraction is rewritten: inductor sums more
#: than 4096 through its cascade-sum helper (``need_use_acc_helper``), fewer in registers, and there
#: its loop is as fast as the library call. The value follows inductor's threshold, which this
#: package cannot read: if inductor changes it, the rewrite is only less useful, never wrong
MIN_CONTRACTED = 4097
#: the products a GEMM sums in order before the partial sums are added (inductor's cascade chunk)
CHUNK = 4096


def outer_contractions_as_matmul(graph: torch.fx.GraphModule, min_contracted: int = MIN_CONTRACTED) -> int:
    """Rewrite ``sum(mul(a, b), dims)`` into ``mm`` (chunked by ``bmm`` past ``2 * CHUNK`` summed
    products) in ``graph`` (CPU tensors only) where it is a contraction over outer dimensions;
    returns how many were rewritten.

    With the product's dimensions split into contracted :math:`K` (summed; present in both
    factors), :math:`M` (kept; only in ``a``) and :math:`N` (kept; only in ``b``),

    .. math:: \\sum_{k \\in K} a_{mk}\\, b_{kn} = (A B)_{mn},
        \\quad A \\in \\mathbb{R}^{|M| \\times |K|},\\; B \\in \\mathbb{R}^{|K| \\times |N|}.

    Rewritten only when: both factors are tensors of the product's floating dtype on the CPU
    (``expand`` views are looked through to the tensor they broadcast); every summed dimension is
    in both factors; no kept dimension is in both (no batch dimensions); the innermost dimension
    is not summed; at least ``min_contracted`` elements are summed per output. Nodes without
    tensor metadata (``meta["val"]``) are left alone."""
    count = 0
    for node in list(graph.graph.nodes):
        plan = _plan(node, min_contracted)
        if plan is not None:
            _rewrite(graph.graph, node, *plan)
            count += 1
    if count:
        graph.recompile()
    return count


def linalg_errors_as_nan(graph: torch.fx.GraphModule) -> int:
    """Replace each ``aten._linalg_check_errors(info, ...)`` in ``graph`` by NaN outputs; returns how
    many were replaced.

    ``torch.linalg.cholesky(A)`` (as ``inv``, ``solve``...) is traced as ``linalg_cholesky_ex(A)``,
    which returns the factor :math:`L` and an error code ``info`` per matrix, then a check that
    raises when ``info != 0``. The check is an operation with side effects, and inductor does not
    cache a graph that holds one (``Can't cache HigherOrderOperator: with_effects``), so a model with
    a Cholesky (a GP) compiled from scratch in every process. Here the
    check goes, and every floating-point output of the ``_ex`` operation becomes
    :math:`\\mathrm{where}(\\text{info} = 0, L, \\text{NaN})` per matrix. A failed factorization then
    gives a non-finite loss, which the compiled step refuses or skips like any other
    (:func:`~pyro_elbo.compile.adam.guarded_step`); the eager replay that names the site raises the
    ``torch.linalg`` error itself. Without the rewrite the unchecked factor of a failed Cholesky is
    not NaN but whatever the partial factorization left, so the check cannot simply be dropped."""
    count = 0
    order = {n: i for i, n in enumerate(graph.graph.nodes)}  # of the nodes compared below: they precede every insertion
    check = _overload("_linalg_check_errors")
    for node in list(graph.graph.nodes):
        if check is None or node.target is not check:
            continue
        info = node.args[0]
        info_value = _value(info)
        source = info.args[0] if isinstance(info, torch.fx.Node) and info.target is operator.getitem else None
        if info_value is None or not isinstance(source, torch.fx.Node):
            continue
        outputs = [u for u in source.users if u.target is operator.getitem and u is not info]
        for output in outputs:
            value = _value(output)
            if value is None or not (value.is_floating_point() or value.is_complex()):
                continue
            with graph.graph.inserting_after(max(output, info, key=order.__getitem__)):
                ok = _emit(graph.graph, aten.eq.Scalar, info, 0)
            with graph.graph.inserting_after(ok):
                shaped = _emit(
                    graph.graph, aten.view.default, ok, [*info_value.shape] + [1] * (value.dim() - info_value.dim())
                )
            with graph.graph.inserting_after(shaped):
                poisoned = _emit(graph.graph, aten.where.ScalarOther, shaped, output, math.nan)
            output.replace_all_uses_with(poisoned, delete_user_cb=_other_than(poisoned))
        graph.graph.erase_node(node)
        count += 1
    if count:
        graph.recompile()
    return count


def standard_normals_as_randn(graph: torch.fx.GraphModule) -> int:
    """Rewrite ``torch.empty(shape).normal_()`` (how ``torch.distributions`` draws standard
    normals) into ``torch.randn(shape)`` in ``graph``; returns how many were rewritten.

    Inductor runs an in-place ``normal_`` as one library call per sample site (a buffer, a call,
    a stride check), but generates ``randn`` inside its fused kernel from one seed per graph call.
    The draws are still standard normals from the torch generator's stream, just other ones."""
    order = {node: i for i, node in enumerate(graph.graph.nodes)}
    count = 0
    for node in list(graph.graph.nodes):
        if node.target is not aten.normal_.default or len(node.args) != 1 or node.kwargs:
            continue
        empty = node.args[0]
        if not isinstance(empty, torch.fx.Node) or empty.target is not aten.empty.memory_format:
            continue
        if any(order[user] < order[node] for user in empty.users):  # read before the draw
            continue
        options = {k: v for k, v in empty.kwargs.items() if k in ("dtype", "layout", "device", "pin_memory")}
        with graph.graph.inserting_before(node):
            randn = graph.graph.call_function(aten.randn.default, (empty.args[0],), options)
        randn.meta = dict(node.meta)
        node.replace_all_uses_with(randn)
        empty.replace_all_uses_with(randn)
        graph.graph.erase_node(node)
        graph.graph.erase_node(empty)
        count += 1
    if count:
        graph.recompile()
    return count


#: operations whose second argument is a list of index tensors (boolean masks allowed)
_INDEXING = tuple(
    op
    for op in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, _overload("_unsafe_index_put"))
    if op is not None
)


def constant_masks_as_indices(graph: torch.fx.GraphModule) -> int:
    """Replace each constant boolean mask among the indices of ``aten.index``/``index_put`` in
    ``graph`` by its integer positions, ``x[m] = x[m.nonzero(as_tuple=True)]`` (and likewise for
    ``index_put``); returns how many masks were replaced.

    A mask is constant when it is a tensor constant of the graph (``get_attr``), possibly
    converted to ``bool`` (``_to_copy``): a module's mask buffer, as in ``pyro.nn``'s
    ``MaskedBlockLinear`` of block neural autoregressive flows. Its positions are computed once,
    here, so the indexed result has a static shape instead of the data-dependent one a boolean
    mask gives; masks computed from inputs are left alone."""
    count = 0
    for node in list(graph.graph.nodes):
        if node.target not in _INDEXING or len(node.args) < 2 or not isinstance(node.args[1], (list, tuple)):
            continue
        indices: list[Any] = []
        for index in node.args[1]:
            mask = _constant_mask(graph, index)
            if mask is None:
                indices.append(index)
                continue
            for position in mask.nonzero(as_tuple=True):
                indices.append(_constant(graph, node, position))
            count += 1
        if len(indices) != len(node.args[1]) or any(a is not b for a, b in zip(indices, node.args[1])):
            node.args = (node.args[0], indices, *node.args[2:])
    if count:
        graph.graph.eliminate_dead_code()
        graph.recompile()
    return count


def _constant_mask(graph: torch.fx.GraphModule, index: Any) -> Tensor | None:
    """The boolean tensor ``index`` is, if it is a graph constant (or one converted to ``bool``)."""
    if not isinstance(index, torch.fx.Node):
        return None
    source: Any = index
    to_bool = False
    if index.target is _overload("_to_copy") and index.kwargs.get("dtype") is torch.bool and len(index.args) == 1:
        source, to_bool = index.args[0], True
    if not isinstance(source, torch.fx.Node) or source.op != "get_attr":
        return None
    value = getattr(graph, str(source.target), None)
    if not isinstance(value, Tensor) or is_fake(value):
        return None
    value = value.to(torch.bool) if to_bool else value
    return value if value.dtype == torch.bool else None


def _constant(graph: torch.fx.GraphModule, before: torch.fx.Node, value: Tensor) -> torch.fx.Node:
    """A new tensor constant of ``graph`` holding ``value``, read just before ``before``."""
    number = 0
    while hasattr(graph, f"_mask_positions{number}"):
        number += 1
    name = f"_mask_positions{number}"
    graph.register_buffer(name, value)
    with graph.graph.inserting_before(before):
        node = graph.graph.get_attr(name)
    fake = fake_mode_of([v for v in (_value(a) for a in before.all_input_nodes) if v is not None])
    if fake is not None:
        node.meta["val"] = fake.from_tensor(value)
    return node


def _other_than(node: torch.fx.Node) -> Callable[[torch.fx.Node], bool]:
    return lambda user: user is not node


_Plan = tuple[torch.fx.Node, torch.fx.Node, list[int], list[int], list[int], tuple[int, ...]]


def _plan(node: torch.fx.Node, min_contracted: int) -> _Plan | None:
    """``(a, b, M, N, K, full shape)`` if ``node`` is a sum this rewrite takes, else ``None``."""
    if node.target is not aten.sum.dim_IntList or node.kwargs.get("dtype") is not None:
        return None
    product = node.args[0]
    if not isinstance(product, torch.fx.Node) or product.target is not aten.mul.Tensor or product.kwargs:
        return None
    value = _value(product)
    dims = node.args[1] if len(node.args) > 1 else None
    if value is None or not value.dtype.is_floating_point or value.device.type != "cpu":
        return None
    if not isinstance(dims, (list, tuple)) or not dims or not all(isinstance(d, int) for d in dims):
        return None
    full = tuple(int(s) for s in value.shape)
    summed = {d % len(full) for d in dims if isinstance(d, int)}
    factors = [_broadcast_source(f, full, value.dtype) for f in product.args[:2]]
    if factors[0] is None or factors[1] is None:
        return None
    (a, in_a), (b, in_b) = factors[0], factors[1]
    contracted: list[int] = []
    only_a: list[int] = []
    only_b: list[int] = []
    for d, size in enumerate(full):
        if size == 1:
            continue
        if in_a[d] and in_b[d]:
            if d not in summed:
                return None  # a batch dimension
            contracted.append(d)
        elif d in summed:
            return None  # summed in one factor only: not a contraction
        else:
            (only_a if in_a[d] else only_b).append(d)
    inner = max((d for d, s in enumerate(full) if s != 1), default=-1)
    k = math.prod(full[d] for d in contracted)
    if not contracted or inner in contracted or not (only_a or only_b) or k < min_contracted:
        return None
    return a, b, only_a, only_b, contracted, full


def _value(node: Any) -> Tensor | None:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, Tensor) else None


def _broadcast_source(
    factor: Any, full: tuple[int, ...], dtype: torch.dtype
) -> tuple[torch.fx.Node, list[bool]] | None:
    """The tensor ``factor`` broadcasts (through ``expand``) and, per dimension of ``full``,
    whether it has that dimension (its extent there is the product's, not 1)."""
    source = factor
    while isinstance(source, torch.fx.Node) and source.target is aten.expand.default:
        source = source.args[0]
    value = _value(source)
    if not isinstance(source, torch.fx.Node) or value is None or value.dtype != dtype or value.dim() > len(full):
        return None
    aligned = (1,) * (len(full) - value.dim()) + tuple(int(s) for s in value.shape)
    if any(s not in (1, f) for s, f in zip(aligned, full)):
        return None
    return source, [s == f != 1 for s, f in zip(aligned, full)]


def _rewrite(
    g: torch.fx.Graph,
    node: torch.fx.Node,
    a: torch.fx.Node,
    b: torch.fx.Node,
    only_a: list[int],
    only_b: list[int],
    contracted: list[int],
    full: tuple[int, ...],
) -> None:
    """Replace ``node`` by ``reshape(mm(A, B))`` laid out as ``node``'s result."""
    sizes = [full[d] for d in only_a], [full[d] for d in only_b], [full[d] for d in contracted]
    m, n, k = (math.prod(s) for s in sizes)
    with g.inserting_before(node):
        left = _matrix(g, a, full, only_a, contracted, [m, k])
        right = _matrix(g, b, full, contracted, only_b, [k, n])
        out = _chunked_mm(g, left, right, m, n, k)
        kept = only_a + only_b
        order = sorted(kept)  # the sum's result keeps the product's dimension order
        out = _emit(g, aten.reshape.default, out, [full[d] for d in kept])
        perm = [kept.index(d) for d in order]
        if perm != sorted(perm):
            out = _emit(g, aten.permute.default, out, perm)
        result = _value(node)
        assert result is not None
        out = _emit(g, aten.reshape.default, out, list(result.shape))
    out.meta.update({key: v for key, v in node.meta.items() if key != "val"})
    node.replace_all_uses_with(out)
    product = node.args[0]
    g.erase_node(node)
    _erase_if_unused(g, product)


def _erase_if_unused(g: torch.fx.Graph, node: Any) -> None:
    """Erase the product and the ``expand`` views feeding it once nothing reads them."""
    if isinstance(node, torch.fx.Node) and not node.users and node.target in (aten.mul.Tensor, aten.expand.default):
        inputs = node.all_input_nodes
        g.erase_node(node)
        for source in inputs:
            _erase_if_unused(g, source)


def _chunked_mm(g: torch.fx.Graph, left: torch.fx.Node, right: torch.fx.Node, m: int, n: int, k: int) -> torch.fx.Node:
    """``left @ right`` (``[m, k] @ [k, n]``) with inductor's accuracy. A GEMM sums its ``k``
    products in order (float32 error up to :math:`k u`, :math:`u = 2^{-24}`); so does inductor's
    cascade sum up to ``2 * CHUNK`` terms (one level: it sums on in order), so up to there one
    ``mm``. Beyond, where the cascade adds chunk sums pairwise, the sum is chunked likewise: one
    ``bmm`` over the whole chunks of :data:`CHUNK`, its partial products summed, plus one ``mm``
    for the rest, error up to :math:`(\\text{CHUNK} + k / \\text{CHUNK}) u` (measurements in
    ``benchmarks/README.md``)."""
    if k <= 2 * CHUNK:
        return _emit(g, aten.mm.default, left, right)
    whole, rest = divmod(k, CHUNK)  # whole >= 2
    split = whole * CHUNK
    head_left = _emit(g, aten.slice.Tensor, left, 1, 0, split) if rest else left
    head_right = _emit(g, aten.slice.Tensor, right, 0, 0, split) if rest else right
    chunks_left = _emit(
        g, aten.permute.default, _emit(g, aten.reshape.default, head_left, [m, whole, CHUNK]), [1, 0, 2]
    )
    chunks_right = _emit(g, aten.reshape.default, head_right, [whole, CHUNK, n])
    head = _emit(g, aten.sum.dim_IntList, _emit(g, aten.bmm.default, chunks_left, chunks_right), [0])
    if not rest:
        return head
    tail_left = _emit(g, aten.slice.Tensor, left, 1, split, k)
    tail_right = _emit(g, aten.slice.Tensor, right, 0, split, k)
    return _emit(g, aten.add.Tensor, head, _emit(g, aten.mm.default, tail_left, tail_right))


def _matrix(
    g: torch.fx.Graph, source: torch.fx.Node, full: tuple[int, ...], rows: list[int], cols: list[int], shape: list[int]
) -> torch.fx.Node:
    """``source`` (broadcastable to ``full``, present in exactly the dimensions ``rows + cols``)
    as a ``shape`` matrix with the ``rows`` dimensions first."""
    present = sorted(rows + cols)
    squeezed = _emit(g, aten.reshape.default, source, [full[d] for d in present])
    perm = [present.index(d) for d in rows + cols]
    if perm != list(range(len(perm))):
        squeezed = _emit(g, aten.permute.default, squeezed, perm)
    return _emit(g, aten.reshape.default, squeezed, shape)


def _emit(g: torch.fx.Graph, target: Any, *args: Any) -> torch.fx.Node:
    """A new node ``target(*args)``, with ``meta["val"]`` computed on the inputs' fake values."""
    node = g.call_function(target, tuple(args))
    values = [_value(x) if isinstance(x, torch.fx.Node) else x for x in args]
    fake = fake_mode_of([v for v in values if isinstance(v, Tensor)])
    if fake is not None and all(v is not None for v in values):
        with fake:
            node.meta["val"] = target(*values)
    return node
