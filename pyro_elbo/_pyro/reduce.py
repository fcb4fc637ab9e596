"""Reducing a site's log-density to the ``[S, *B]`` layout of :class:`~pyro_elbo.weights.LogWeights`.

Every site's ``log_prob`` is first *aligned*: left-padded to ``max_plate_nesting + 1`` dims, dim 0
the particles and dim ``rank + frame.dim`` each plate. It is then summed over every dim except the
particles and the batch plates (the plates that enclose every site), giving ``[S, *B]``.

Under Pyro's ``TrackNonReparam`` (guides with baseline options, :mod:`pyro_elbo._pyro.score`) a
``log_prob`` carries the names of the non-reparameterized sites it depends on; :meth:`Reducer.aligned`
strips them, so every tensor it returns is a plain tensor, and keeps them per site in
:attr:`Reducer.provenance`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from pyro.distributions.util import scale_and_mask
from pyro.ops.provenance import extract_provenance
from torch import Tensor

from pyro_elbo._pyro.supports import log_prob_outside_support


def without_provenance(x: Tensor) -> tuple[Tensor, frozenset[str]]:
    """``x`` as a plain tensor, and the names of the sites it depends on (empty if untracked)."""
    value, provenance = extract_provenance(x)
    assert isinstance(value, Tensor)
    return value, frozenset(provenance)


class Reducer:
    """Aligns and reduces site log-densities for one pair of traces.

    Args:
        max_plate_nesting: plate dims of the model (the particle plate sits left of them).
        num_particles: ``S``.
        batch: the batch plates' frames, outermost first.
        batch_scale: their subsampling factor; each site's scale is divided by it, so the bound
            of the full data set is ``batch_scale * bound.sum()``.
    """

    def __init__(self, max_plate_nesting: int, num_particles: int, batch: tuple[Any, ...], batch_scale: float):
        self.rank = max_plate_nesting + 1
        self.batch_dims = {self.rank + frame.dim: frame.size for frame in batch}  # positive dims
        self.batch_scale = batch_scale
        self.shape = [num_particles] + [self.batch_dims.get(d, 1) for d in range(1, self.rank)]
        self.out_shape = [num_particles] + [self.batch_dims[d] for d in sorted(self.batch_dims)]
        self.like: Tensor | None = None
        #: ``(role, site name) -> names of the non-reparameterized sites its log-density depends on``
        #: (filled only where values carry provenance; ``role`` is ``"model"`` or ``"guide"``)
        self.provenance: dict[tuple[str, str], frozenset[str]] = {}

    def aligned(self, site: dict[str, Any], scaled: bool = True, role: str = "model", extra_dims: int = 0) -> Tensor:
        """The site's ``log_prob`` with ``rank`` dims; ``scaled=False`` leaves out scale and mask
        (the score function :math:`\\nabla \\log q`, as in Pyro's ``ScoreParts``: a
        distribution's own ``.mask(...)`` does not apply either). ``role`` keys
        the site's :attr:`provenance`. ``extra_dims`` more dims are allowed left of the particle
        dim (the guide's enumeration dims, :func:`~pyro_elbo._pyro.enum.guide_enumerated_weights`)."""
        fn = site["fn"]
        try:
            if not scaled and hasattr(fn, "score_parts"):  # a masked distribution's score is unmasked
                log_prob = fn.score_parts(site["value"], *site["args"], **site["kwargs"]).score_function
            else:
                log_prob = fn.log_prob(site["value"], *site["args"], **site["kwargs"])
        except ValueError as error:  # distribution validation: say which site
            outside = None if site["is_observed"] or role != "model" else log_prob_outside_support(fn, site["value"])
            if outside is None:
                kind = "observed" if site["is_observed"] else "latent"
                raise ValueError(f"{kind} site '{site['name']}': {error}") from error
            log_prob = outside  # a guide draw outside the model's support: density zero there
        if scaled:
            scale = site["scale"] / self.batch_scale if self.batch_scale != 1.0 else site["scale"]
            log_prob = scale_and_mask(log_prob, scale, site["mask"])
        if not isinstance(log_prob, Tensor):
            log_prob = torch.as_tensor(log_prob)
        log_prob, provenance = without_provenance(log_prob)
        if provenance:
            self.provenance[(role, site["name"])] = provenance
        self.like = log_prob
        rank = self.rank + extra_dims
        extra = log_prob.dim() - rank
        if extra > 0 and all(size == 1 for size in log_prob.shape[:extra]):  # e.g. Normal(zeros(1, 1)), no plate
            log_prob = log_prob.reshape(log_prob.shape[extra:])
            extra = 0
        if extra > 0:  # batch dims left of the particle dim cannot happen under our plate
            raise ValueError(
                f"site '{site['name']}' has log_prob of shape {tuple(log_prob.shape)}, more dims than "
                f"max_plate_nesting={self.rank - 1} allows; pass a larger max_plate_nesting"
            )
        return log_prob.reshape((1,) * -extra + tuple(log_prob.shape))

    def reduce(self, aligned: Tensor) -> Tensor:
        """Sum an aligned tensor over every dim but the particles and the batch plates: ``[S, *B]``."""
        keep = {0, *self.batch_dims}
        sum_dims = [d for d in range(self.rank) if d not in keep and aligned.shape[d] != 1]
        if sum_dims:
            aligned = aligned.sum(sum_dims, keepdim=True)
        return aligned.expand(self.shape).reshape(self.out_shape)

    def batch_last(self, aligned: Tensor) -> Tensor:
        """An aligned tensor as ``[S, *B, E]``: particles, batch plates, then every other entry."""
        full = aligned.expand(torch.broadcast_shapes(tuple(aligned.shape), tuple(self.shape)))
        batch = sorted(self.batch_dims)
        rest = [d for d in range(1, self.rank) if d not in self.batch_dims]
        return full.permute(0, *batch, *rest).reshape(*self.out_shape, -1)

    def __call__(self, site: dict[str, Any]) -> Tensor:
        return self.reduce(self.aligned(site))

    def total(self, parts: Iterable[Tensor]) -> Tensor:
        """The sum of ``[S, *B]`` parts (zeros if there are none)."""
        result = None
        for part in parts:
            result = part if result is None else result + part
        if result is None:
            return torch.zeros(self.out_shape) if self.like is None else self.like.new_zeros(self.out_shape)
        return result
