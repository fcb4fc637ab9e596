"""Rewrites of a captured training step's FX graph that let the forward pass and its gradient
share work inductor would otherwise do twice.

:func:`logit_losses_share_exp` evaluates the Bernoulli-with-logits log-density and the
:math:`\\sigma(z)` of its gradient from one exponential per element. A ``Bernoulli(logits=z)``
observation (logistic regression, a binary classifier's likelihood) is traced as
``binary_cross_entropy_with_logits(z, y)``, which inductor decomposes into the stable form

.. math:: \\ell(z, y) = (1 - y)\\, z - \\min(0, z) + \\log(1 + t), \\qquad t = e^{-|z|},

and its gradient :math:`\\partial \\ell / \\partial z = \\sigma(z) - y` as ``sigmoid(z)``, a second
exponential :math:`\\sigma(z) = 1 / (1 + e^{-z})`. With the same :math:`t`,

.. math:: \\sigma(z) = \\frac{1}{1 + t} \\;(z \\ge 0), \\qquad \\sigma(z) = \\frac{t}{1 + t} \\;(z < 0),

so one exponential serves both (on an N-vector of logits, N exponentials fewer per step; the
result differs from ``torch.sigmoid`` by float rounding, and for :math:`z \\ll 0`, where
:math:`e^{-z}` overflows, it keeps :math:`t` instead of flushing to 0). The loss is written
exactly as inductor's decomposition writes it, so its value is unchanged.

:func:`small_operands_computed_once` stores a small value computed in the graph (the guide's draw
:math:`w` of a linear predictor ``(x * w).sum(-1)``) once, where inductor would evaluate it again
for every row of the large product that reads it.

:data:`FUSED_REWRITES` lists the rewrites in the form of the compiled path's rewrite table
(name, function, whether the ``"eager"`` backend applies it, what the step loses when it fails).
Measurements are in ``benchmarks/README.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pyro_elbo.compile.inductor import prepare_compile_fx

aten = torch.ops.aten

#: ``(name, rewrite, applied by the "eager" backend, what the step loses when the rewrite fails)``
RewriteEntry = tuple[str, Callable[[torch.fx.GraphModule], int], bool, str]


def logit_losses_share_exp(graph: torch.fx.GraphModule) -> int:
    """Rewrite each ``binary_cross_entropy_with_logits(z, y)`` (no weights, no reduction) whose
    logits ``z`` also feed ``sigmoid(z)`` into the stable form above, with the sigmoid computed
    from the same :math:`t = e^{-|z|}`; returns how many were rewritten.

    Nodes with another ``weight``, ``pos_weight`` or ``reduction``, and logits whose sigmoid the
    graph does not take (nothing to share), are left alone. Every new node gets fake-tensor
    metadata (``meta["val"]``) when its inputs have it."""
    count = 0
    for node in list(graph.graph.nodes):
        if node.target is not aten.binary_cross_entropy_with_logits.default or not _unweighted_elementwise(node):
            continue
        logits, target = node.args[0], node.args[1]
        if not isinstance(logits, torch.fx.Node) or not isinstance(target, torch.fx.Node):
            continue
        sigmoids = [u for u in logits.users if u.target is aten.sigmoid.default and u.args[0] is logits]
        if not sigmoids:
            continue
        g = graph.graph
        with g.inserting_before(node):
            t = _emit(g, aten.exp.default, _emit(g, aten.neg.default, _emit(g, aten.abs.default, logits)))
            softplus_neg_abs = _emit(g, aten.log1p.default, t)
            log_sigmoid = _emit(g, aten.sub.Tensor, _emit(g, aten.clamp_max.default, logits, 0), softplus_neg_abs)
            loss = _emit(
                g,
                aten.sub.Tensor,
                _emit(g, aten.mul.Tensor, _emit(g, aten.rsub.Scalar, target, 1), logits),
                log_sigmoid,
            )
        _replace(node, loss)
        for sigmoid in sigmoids:
            with g.inserting_before(sigmoid):
                numerator = _emit(g, aten.where.ScalarSelf, _emit(g, aten.ge.Scalar, logits, 0), 1.0, t)
                shared = _emit(g, aten.div.Tensor, numerator, _emit(g, aten.add.Tensor, t, 1))
            _replace(sigmoid, shared)
        count += 1
    if count:
        graph.graph.eliminate_dead_code()
        graph.recompile()
    return count


#: the fewest elements of a result for which its small computed operands are stored once
MIN_BROADCAST_ELEMENTS = 4096
#: how many times larger than an operand a result must be for the operand to be stored once
MIN_BROADCAST_RATIO = 64
#: operations that only view their input (a chain of them is looked through to the computed value)
_VIEWS = frozenset(
    op
    for op in (
        aten.expand.default,
        aten.view.default,
        aten.reshape.default,
        aten.unsqueeze.default,
        aten.squeeze.dim,
        aten.permute.default,
        aten.slice.Tensor,
        aten.select.int,
    )
)
_BINARY = frozenset((aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor))


def small_operands_computed_once(graph: torch.fx.GraphModule) -> int:
    """Store each small computed operand of a large elementwise product once, before the loop
    that reads it; returns how many operands were wrapped.

    Inductor inlines a cheap elementwise value into every loop that reads it: in ``(x * w).sum(-1)``
    with the guide's draw :math:`w = \\mu + \\sigma \\varepsilon` (``D`` elements) and data ``x``
    (``N x D``), it evaluates :math:`\\mu + \\sigma \\varepsilon` again for each of the ``N`` rows,
    loading three vectors instead of one per ``D`` (with masked loads when ``D`` is not a multiple
    of the vector width). Here an operand of ``mul``/``add``/``sub``/``div`` that is computed in the
    graph (not an input or a constant, looked through views), holds more than one element and is
    at least :data:`MIN_BROADCAST_RATIO` times smaller than a result of at least
    :data:`MIN_BROADCAST_ELEMENTS` elements, is passed through inductor's
    ``prims.inductor_force_stride_order`` with its own strides: the same values, which inductor
    stores in a buffer of their own. CPU graphs only; operands written in place (directly or
    through a view) are left alone. Where this torch has no such operation, nothing is rewritten."""
    force = _force_stride_order()
    if force is None:
        return 0
    stored: dict[torch.fx.Node, torch.fx.Node] = {}
    count = 0
    for node in list(graph.graph.nodes):
        result = node.meta.get("val")
        if node.target not in _BINARY or not isinstance(result, Tensor) or result.device.type != "cpu":
            continue
        if result.numel() < MIN_BROADCAST_ELEMENTS:
            continue
        for operand in node.all_input_nodes:
            value = operand.meta.get("val")
            if operand in stored.values() or not isinstance(value, Tensor) or not value.is_floating_point():
                continue
            if not 1 < value.numel() <= result.numel() // MIN_BROADCAST_RATIO or not _computed(operand):
                continue
            if operand not in stored:
                with graph.graph.inserting_after(operand):
                    stored[operand] = _emit(graph.graph, force, operand, list(value.stride()))
                count += 1
            node.replace_input_with(operand, stored[operand])
    if count:
        graph.recompile()
    return count


FUSED_REWRITES: tuple[RewriteEntry, ...] = (
    (
        "logit_losses_share_exp",
        logit_losses_share_exp,
        False,
        "a Bernoulli(logits) likelihood and its gradient each evaluate an exponential per data point",
    ),
    (
        "small_operands_computed_once",
        small_operands_computed_once,
        False,
        "small values broadcast into large loops are computed again for every element",
    ),
)


def _unweighted_elementwise(node: torch.fx.Node) -> bool:
    """``binary_cross_entropy_with_logits(input, target, weight=None, pos_weight=None, reduction=0)``."""
    names = ("input", "target", "weight", "pos_weight", "reduction")
    given: dict[str, object] = {**dict(zip(names, node.args)), **node.kwargs}
    reduction = given.get("reduction", 1)  # Reduction::Mean by default; 0 is Reduction::None
    unweighted = given.get("weight") is None and given.get("pos_weight") is None
    return len(node.args) >= 2 and unweighted and isinstance(reduction, int) and reduction == 0


def _replace(old: torch.fx.Node, new: torch.fx.Node) -> None:
    new.meta.update({key: v for key, v in old.meta.items() if key != "val"})
    old.replace_all_uses_with(new)


def _emit(g: torch.fx.Graph, target: Any, *args: Any) -> torch.fx.Node:
    """A new node ``target(*args)``, with ``meta["val"]`` computed in the inputs' fake mode (the
    ``fake_mode`` attribute of their fake-tensor values) when every tensor input has one."""
    node = g.call_function(target, tuple(args))
    values = [a.meta.get("val") if isinstance(a, torch.fx.Node) else a for a in args]
    tensors = [v for v in values if isinstance(v, Tensor)]
    modes = {id(m): m for m in (getattr(v, "fake_mode", None) for v in tensors)}
    mode = next(iter(modes.values())) if len(modes) == 1 else None
    if mode is not None and all(v is not None for v in values):
        with mode:
            node.meta["val"] = target(*values)
    return node


def _computed(node: torch.fx.Node) -> bool:
    """Whether ``node`` (looked through views) is computed by the graph, not an input or constant,
    and nothing writes it in place, directly or through any view of it (a stored copy would then
    go stale)."""
    while node.op == "call_function" and node.target in _VIEWS and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    if node.op != "call_function":
        return False
    seen, pending = {node}, [node]
    while pending:
        for user in pending.pop().users:
            if _writes(user):
                return False
            if user.target in _VIEWS and user not in seen:
                seen.add(user)
                pending.append(user)
    return True


def _writes(node: torch.fx.Node) -> bool:
    """Whether ``node`` is an operation that writes one of its inputs (``copy_``, ``normal_``, ...)."""
    schema = getattr(node.target, "_schema", None)
    return bool(getattr(schema, "is_mutable", False))


def _force_stride_order() -> Any:
    """Inductor's ``prims.inductor_force_stride_order`` (registered when inductor is imported), or
    ``None`` where this torch has none."""
    for attempt in range(2):
        try:
            return torch.ops.prims.inductor_force_stride_order.default
        except (AttributeError, RuntimeError):
            if attempt == 0:
                prepare_compile_fx()  # imports inductor, which registers its operations
    return None
