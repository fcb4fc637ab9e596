r"""Adam's update and the non-finite guard as graph operations, for the compiled step.

With a plain Adam optimizer (:func:`plain_adam`) the update runs inside the captured graph
(:class:`~pyro_elbo.compile.graph.CompiledLoss`): per parameter (:func:`adam_update`, on the
optimizer's own state tensors: :func:`adam_step`), or on all parameters laid out in one flat vector
:math:`\theta \in \mathbb{R}^D` with the moments laid out alike (:func:`flat_adam_update`, on the
buffers of :mod:`pyro_elbo.compile.flat`). Both use one formula (:func:`adam_moments`). The flat
step applies its update only where the loss and gradient are finite and the non-finite ledger
(:func:`guarded_step`) has not halted, so the host reads nothing back each step. The graph's
inputs are named tuples (:class:`AdamScalars`, :class:`AdamMoments`, :class:`AdamBuffers`,
:class:`Ledger`), not positional lists.

References:
    | Adam: A Method for Stochastic Optimization (Kingma et al., 2015)
    | https://arxiv.org/abs/1412.6980
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from pyro_elbo.compile.graph import CompiledLoss


class AdamScalars(NamedTuple):
    """An optimizer's ``lr, betas, eps`` as 0-d tensors: inputs of the in-graph Adam update (a
    scheduler's change is a new input, not a new graph)."""

    lr: Tensor
    beta1: Tensor
    beta2: Tensor
    eps: Tensor


class AdamMoments(NamedTuple):
    """``torch.optim.Adam``'s state of each parameter, as the per-parameter in-graph update reads it."""

    exp_avg: list[Tensor]
    exp_avg_sq: list[Tensor]
    #: the step count (float32, as Adam keeps it; one for all parameters)
    step: Tensor


class AdamBuffers(NamedTuple):
    """The flat compiled step's state (:mod:`pyro_elbo.compile.flat`): the parameters :math:`\\theta`
    in one vector, the Adam moments :math:`m, v` laid out alike, one step count per parameter and
    the non-finite ledger of :func:`guarded_step`."""

    params: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    steps: Tensor
    ledger: Tensor


class Ledger(NamedTuple):
    """The entries of :func:`guarded_step`'s ledger, in the order the ledger vector holds them."""

    limit: Tensor
    consecutive: Tensor
    skipped: Tensor
    calls: Tensor
    halted_at: Tensor


#: ``(name, shape)`` of each parameter, in the order they are laid out in a flat vector
Layout = tuple[tuple[str, tuple[int, ...]], ...]


def all_finite(loss: Tensor, grads: list[Tensor]) -> Tensor:
    """A boolean scalar: the loss and every gradient are finite (no host sync)."""
    return torch.stack([torch.isfinite(loss).all()] + [torch.isfinite(g).all() for g in grads]).all()


def adam_update(params: list[Tensor], grads: list[Tensor], state: AdamMoments, scalars: AdamScalars) -> list[Tensor]:
    """torch.optim.Adam's update (no weight decay, no amsgrad) of each parameter
    (:func:`adam_moments`), as graph operations: returns the new parameters, first moments,
    second moments and step count."""
    step = state.step + 1
    updates = [
        adam_moments(p, g, m, v, step, *scalars) for p, g, m, v in zip(params, grads, state.exp_avg, state.exp_avg_sq)
    ]
    return [*(p.detach() for p, _, _ in updates), *(m for _, m, _ in updates), *(v for _, _, v in updates), step]


#: the entries of :func:`guarded_step`'s ledger, in order
LEDGER_FIELDS = Ledger._fields


def guarded_step(finite: Tensor, ledger: Tensor) -> tuple[Tensor, Tensor]:
    r"""Whether a step may write, and the non-finite ledger after it: graph operations, so the host
    need not read a flag every step (on CUDA, a synchronization).

    ``ledger`` is an integer vector :math:`(\ell, c, s, n, h)` (:data:`LEDGER_FIELDS`): the limit
    :math:`\ell` of consecutive non-finite steps, the current run :math:`c` of them, the number
    :math:`s` of non-finite steps seen, the number :math:`n` of steps called and the call :math:`h`
    at which the ledger halted (0: not halted). A step is *alive* while :math:`c < \ell`; it applies
    its update iff it is alive and finite:

    .. math::
        a = [c < \ell] \wedge \text{finite}, \quad
        c' = \begin{cases} 0 & \text{alive, finite} \\ c + 1 & \text{alive, not finite} \\
        c & \text{halted} \end{cases}, \quad
        s' = s + [c < \ell \wedge \neg\text{finite}], \quad n' = n + 1, \quad
        h' = \begin{cases} n' & c < \ell \le c' \\ h & \text{else} \end{cases}

    With :math:`\ell = 1` (``on_nonfinite="raise"``) the first non-finite step halts the ledger, so
    it and every later step change nothing until the host reads it (and raises); with
    :math:`\ell = ` ``max_consecutive_skips`` (``"skip"``) non-finite steps are skipped and
    :math:`\ell` of them in a row halt it. Returns :math:`(a, (\ell, c', s', n', h'))`."""
    limit, consecutive, skipped, calls, halted_at = Ledger(*ledger.unbind())
    alive = consecutive < limit
    applied = finite & alive
    refused = alive & ~finite
    new_consecutive = torch.where(
        refused, consecutive + 1, torch.where(alive, torch.zeros_like(consecutive), consecutive)
    )
    new_calls = calls + 1
    new_halted_at = torch.where(refused & (new_consecutive >= limit), new_calls, halted_at)
    new_skipped = skipped + refused.to(skipped.dtype)
    return applied, torch.stack(Ledger(limit, new_consecutive, new_skipped, new_calls, new_halted_at))


def split(flat: Tensor, layout: Layout) -> list[Tensor]:
    """Views of ``flat``, one per ``(name, shape)`` of ``layout``, laid out one after another."""
    views, offset = [], 0
    for _, shape in layout:
        size = math.prod(shape)
        views.append(flat[offset : offset + size].view(shape))
        offset += size
    return views


def flat_adam_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    steps: Tensor,
    lr: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    eps: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""torch.optim.Adam's update (no weight decay, no amsgrad) on flat vectors, as graph operations:

    .. math::
        t' = t + 1, \quad m' = \beta_1 m + (1 - \beta_1) g, \quad v' = \beta_2 v + (1 - \beta_2) g^2, \\
        \theta' = \theta - \frac{\eta}{1 - \beta_1^{t'}} \, \frac{m'}{\sqrt{v'} / \sqrt{1 - \beta_2^{t'}} + \epsilon}

    with one step count per parameter in ``steps`` (all equal; the first one is used). Returns
    :math:`(\theta', m', v', t')`.

    References:
        | Adam: A Method for Stochastic Optimization (Kingma et al., 2015)
        | https://arxiv.org/abs/1412.6980
    """
    new_steps = steps + 1
    return (*adam_moments(param, grad, exp_avg, exp_avg_sq, new_steps[0], lr, beta1, beta2, eps), new_steps)


def adam_moments(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    lr: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    eps: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""One Adam update at step count ``step`` (already incremented, :math:`t'`):

    .. math::
        m' = \beta_1 m + (1 - \beta_1) g, \quad v' = \beta_2 v + (1 - \beta_2) g^2, \quad
        \theta' = \theta - \frac{\eta}{1 - \beta_1^{t'}} \, \frac{m'}{\sqrt{v'} / \sqrt{1 - \beta_2^{t'}} + \epsilon}

    Returns :math:`(\theta', m', v')`; the one formula of both in-graph Adam paths
    (:func:`adam_update` per parameter, :func:`flat_adam_update` on the flat vector)."""
    bias1 = 1 - beta1**step
    bias2_sqrt = (1 - beta2**step).sqrt()
    m = exp_avg * beta1 + grad * (1 - beta1)
    v = exp_avg_sq * beta2 + grad * grad * (1 - beta2)
    return param - (lr / bias1) * m / (v.sqrt() / bias2_sqrt + eps), m, v


def adam_scalars(
    group: dict[str, Any], cached: tuple[Any, AdamScalars] | None, dtype: torch.dtype, device: torch.device
) -> tuple[Any, AdamScalars]:
    """``lr, beta1, beta2, eps`` of an optimizer's param group as tensors of ``dtype`` on
    ``device``, with the key they were made for: ``cached`` itself while that key still holds, so
    a compiled step gets new scalar tensors only when a scheduler or the user changes them."""
    beta1, beta2 = group["betas"]
    values = (float(group["lr"]), float(beta1), float(beta2), float(group["eps"]))  # a tensor lr may change in place
    key = (values, dtype, device)
    if cached is not None and cached[0] == key:
        return cached
    return key, AdamScalars(*(torch.tensor(v, dtype=dtype, device=device) for v in values))


def plain_adam(opt: torch.optim.Optimizer) -> bool:
    """Adam with one parameter group and no weight decay, amsgrad or maximize: its update can run
    inside the compiled graph (:func:`adam_step`)."""
    if type(opt) is not torch.optim.Adam or len(opt.param_groups) != 1:
        return False
    group = opt.param_groups[0]
    return not (group["weight_decay"] or group["amsgrad"] or group["maximize"] or group.get("differentiable"))


def adam_step(
    compiled: CompiledLoss,
    params: dict[str, Tensor],
    opt: torch.optim.Optimizer,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[float, bool] | None:
    """Loss, gradient and Adam update (:func:`adam_update`) in one graph call for a
    :func:`plain_adam` optimizer; ``None`` if the graph is not available (run eagerly).

    The optimizer's own state tensors (``exp_avg``, ``exp_avg_sq``, ``step``) are read and written,
    so checkpoints, schedulers (the learning rate is an input) and resume work unchanged. Nothing
    is written when the step is not finite. Returns ``(loss, finite)``."""
    group = opt.param_groups[0]
    tensors = list(params.values())
    states = []
    for p in tensors:
        state = opt.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states.append(state)
    device, dtype = tensors[0].device, tensors[0].dtype
    cached = compiled.adam_scalars = adam_scalars(group, compiled.adam_scalars, dtype, device)
    step = states[0]["step"]  # float32, as torch's Adam keeps it; promoted inside the graph
    moments = AdamMoments([s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], step)
    out = compiled(params, args, kwargs, (moments, cached[1]))
    if out is None:
        return None
    loss, finite, updated = out
    ok = bool(finite)
    if ok:
        n = len(tensors)
        with torch.no_grad():
            torch._foreach_copy_(tensors, updated[:n])
        new_step = updated[3 * n]
        for i, state in enumerate(states):
            state["exp_avg"] = updated[n + i]
            state["exp_avg_sq"] = updated[2 * n + i]
            state["step"] = new_step if i == 0 else new_step.clone()  # never shared: eager Adam steps in place
    return float(loss), ok
