"""Closed-form KL terms in place of Monte Carlo log-density differences (``ELBO(analytic_kl=True)``).

For a latent site :math:`z` drawn after every site its model density depends on, the ELBO's term
:math:`E_q[\\log p(z \\mid \\mathrm{pa}) - \\log q(z \\mid u)]` equals, conditionally on the values drawn
before it, :math:`-\\mathrm{KL}(q(\\cdot \\mid u) \\,\\|\\, p(\\cdot \\mid \\mathrm{pa}))`. Replacing the
per-particle difference by that conditional expectation (Rao-Blackwellization) leaves the ELBO's value
and expected gradient unchanged and lowers its variance. Pyro's ``TraceMeanField_ELBO`` does the same
for mean-field guides; here the guide may have any dependency structure, as long as it draws ``z``
after every latent that precedes ``z`` in the model (so ``pa`` is fixed when ``z`` is drawn).

Used for a site only when it is reparameterized in the guide, both distributions have a registered
``torch.distributions.kl_divergence`` and the same event shape; elsewhere the Monte Carlo term stays.

References:
    | Auto-Encoding Variational Bayes (Kingma & Welling, 2014), Appendix B
    | https://arxiv.org/abs/1312.6114
"""

from __future__ import annotations

from typing import Any

import torch
from pyro.distributions.util import scale_and_mask
from torch import Tensor

from pyro_elbo._pyro.reduce import Reducer


def _kl(guide_fn: Any, model_fn: Any) -> Tensor | None:
    if guide_fn.event_shape != model_fn.event_shape:
        return None
    try:
        return torch.distributions.kl_divergence(guide_fn, model_fn)
    except NotImplementedError:
        return None


def replace_with_kl(
    model_sites: dict[str, dict[str, Any]],
    guide_sites: dict[str, dict[str, Any]],
    model_aligned: dict[str, Tensor],
    guide_aligned: dict[str, Tensor],
    reducer: Reducer,
) -> tuple[str, ...]:
    """Replace ``model_aligned[z] - guide_aligned[z]`` by ``-KL`` (in ``model_aligned``, with
    ``guide_aligned[z] = 0``) for every eligible latent ``z``; return the names replaced."""
    model_order = [name for name, site in model_sites.items() if not site["is_observed"]]
    guide_position = {name: i for i, name in enumerate(guide_sites)}
    replaced = []
    for position, name in enumerate(model_order):
        guide_site = guide_sites.get(name)
        if guide_site is None or not guide_site["fn"].has_rsample or name not in model_aligned:
            continue
        earlier = model_order[:position]
        if any(guide_position.get(other, -1) > guide_position[name] for other in earlier):
            continue  # a model parent of z is drawn after z in the guide
        kl = _kl(guide_site["fn"], model_sites[name]["fn"])
        if kl is None:
            continue
        site = model_sites[name]
        scale = site["scale"] / reducer.batch_scale if reducer.batch_scale != 1.0 else site["scale"]
        kl = scale_and_mask(kl, scale, site["mask"])
        aligned = kl.reshape((1,) * (reducer.rank - kl.dim()) + tuple(kl.shape))
        model_aligned[name] = -aligned
        guide_aligned[name] = torch.zeros_like(aligned)
        replaced.append(name)
    return tuple(replaced)
