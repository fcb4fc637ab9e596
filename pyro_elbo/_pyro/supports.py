"""Does the guide draw only values the model can score? Support comparison per latent site.

The bound :math:`\\mathbb{E}_q[\\log p(x, z) - \\log q(z)]` is defined only when
:math:`\\operatorname{supp} q \\subseteq \\operatorname{supp} p` (otherwise
:math:`\\mathrm{KL}(q \\,\\|\\, p) = \\infty`). A ``Normal`` guide for a ``HalfCauchy`` latent breaks
this; with one particle it often draws a positive value and the bound is silently meaningless.

A support is read from ``site["fn"].support`` after unwrapping ``independent`` (event dims do not
change the set of values per element). Where a guide is a ``TransformedDistribution`` the support is
pushed forward through its transforms, because ``AffineTransform`` declares ``real`` as its codomain
even when it maps ``(0, 1)`` onto ``(a, b)`` (this is how ``biject_to(interval(a, b))`` is built,
used by the Messenger autoguides). Point-mass guide sites (``Delta``: ``AutoDelta`` and the sites
``AutoNormal``/``AutoContinuous`` guides push forward from their latent) are not compared: their
nominal support is ``real`` and their value is checked by the model's own ``log_prob`` validation.

Only provable widenings raise; a pair of supports this module cannot compare passes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pyro.infer.util import is_validation_enabled
from torch.distributions import constraints
from torch.distributions import constraints as C
from torch.distributions.transforms import AffineTransform, ComposeTransform, Transform

from pyro_elbo._pyro._sites import is_deterministic, sample_sites

#: ``(lower, upper, discrete)``: an interval of the reals (bounds may be tensors), or of the integers.
Interval = tuple[Any, Any, bool]


def check_supports(model_trace: Any, guide_trace: Any) -> None:
    """Raise ``ValueError`` if a guide site can draw values outside the model site's support.

    Compares every latent site present in both traces (guide sites that are observed, auxiliary or
    point masses are skipped). A pure function of the two traces: it may be called once per
    model/guide pair.

    Raises:
        ValueError: naming the site, both supports and the usual fixes.
    """
    model_sites = sample_sites(model_trace)
    for name, guide_site in sample_sites(guide_trace).items():
        model_site = model_sites.get(name)
        if model_site is None or model_site["is_observed"] or guide_site["is_observed"]:
            continue
        if is_deterministic(model_site) or guide_site["infer"].get("is_auxiliary", False):
            continue
        if _is_point_mass(guide_site["fn"]):
            continue
        model_support = _support(model_site["fn"])
        guide_support = _support(guide_site["fn"])
        if model_support is None or guide_support is None:
            continue
        if _wider(guide_support, model_support):
            raise ValueError(
                f"Guide site '{name}' has support {_describe(guide_support)}, wider than the model's "
                f"{_describe(model_support)} (model distribution {type(_base(model_site['fn'])).__name__}, "
                f"guide {type(_base(guide_site['fn'])).__name__}): the guide can draw values the model "
                "cannot score, and the bound is then meaningless. Use a guide distribution on the "
                "model's support (e.g. LogNormal or Gamma for a positive latent, Beta for (0, 1)), "
                "transform an unconstrained draw with biject_to(model support), or an autoguide."
            )


def _base(fn: Any) -> Any:
    """Strip wrappers that keep the support: Independent, Masked, Expanded, Scaled."""
    while True:
        inner = getattr(fn, "base_dist", None)
        if inner is None or type(fn).__name__ not in (
            "Independent",
            "MaskedDistribution",
            "ExpandedDistribution",
            "ScaledDistribution",
        ):
            return fn
        fn = inner


def _is_point_mass(fn: Any) -> bool:
    return type(_base(fn)).__name__ == "Delta"


def _unwrap(constraint: Any) -> Any:
    while isinstance(constraint, C._IndependentConstraint):
        constraint = constraint.base_constraint
    return constraint


def _support(fn: Any) -> Any:
    """The support of ``fn`` as an :data:`Interval` where it is one, else its constraint; or None."""
    base = _base(fn)
    transforms = getattr(base, "transforms", None)
    if transforms is not None and hasattr(base, "base_dist"):
        support = _support(base.base_dist)
        for transform in _flatten(transforms):
            if support is None:
                return None
            support = _push(support, transform)
        return support
    try:
        constraint = fn.support
    except NotImplementedError:
        return None
    if constraints.is_dependent(constraint):
        return None
    constraint = _unwrap(constraint)
    interval = _interval(constraint)
    return constraint if interval is None else interval


def _flatten(transforms: list[Transform]) -> list[Transform]:
    flat: list[Transform] = []
    for transform in transforms:
        if isinstance(transform, ComposeTransform):
            flat.extend(_flatten(list(transform.parts)))
        else:
            flat.append(transform)
    return flat


def _push(support: Any, transform: Transform) -> Any:
    """The image of ``support`` under ``transform`` (exact for affine maps of intervals)."""
    if isinstance(transform, AffineTransform) and isinstance(support, tuple) and not support[2]:
        lower, upper, _ = support
        if not _comparable(lower, upper, transform.loc, transform.scale):
            return None
        a = transform.loc + transform.scale * lower
        b = transform.loc + transform.scale * upper
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            a, b = torch.as_tensor(a), torch.as_tensor(b)
            return (torch.minimum(a, b), torch.maximum(a, b), False)
        return (min(a, b), max(a, b), False)
    try:
        codomain = transform.codomain
    except NotImplementedError:
        return None
    if constraints.is_dependent(codomain):
        return None
    codomain = _unwrap(codomain)
    interval = _interval(codomain)
    return codomain if interval is None else interval


def _interval(constraint: Any) -> Interval | None:
    inf = math.inf
    if isinstance(constraint, C._Real):
        return (-inf, inf, False)
    if isinstance(constraint, (C._GreaterThan, C._GreaterThanEq)):
        return (constraint.lower_bound, inf, False)
    if isinstance(constraint, C._LessThan):
        return (-inf, constraint.upper_bound, False)
    if isinstance(constraint, (C._Interval, C._HalfOpenInterval)):
        return (constraint.lower_bound, constraint.upper_bound, False)
    if isinstance(constraint, C._Boolean):
        return (0, 1, True)
    if isinstance(constraint, C._IntegerInterval):
        return (constraint.lower_bound, constraint.upper_bound, True)
    if isinstance(constraint, C._IntegerGreaterThan):
        return (constraint.lower_bound, inf, True)
    if isinstance(constraint, C._IntegerLessThan):
        return (-inf, constraint.upper_bound, True)
    return None


def _comparable(*values: Any) -> bool:
    """Tensor bounds are compared only with validation on (off while a step is being captured)."""
    return all(not isinstance(v, torch.Tensor) for v in values) or is_validation_enabled()


def _wider(guide: Any, model: Any) -> bool:
    """True only if the guide's support is provably not inside the model's."""
    if isinstance(guide, tuple) and isinstance(model, tuple):
        g_lower, g_upper, g_discrete = guide
        m_lower, m_upper, m_discrete = model
        if m_discrete and not g_discrete:
            return True  # a continuous guide for a discrete latent
        if g_discrete and not m_discrete:
            return False  # a pmf against a density: not a support question
        bounds = (g_lower, g_upper, m_lower, m_upper)
        if all(not isinstance(v, torch.Tensor) for v in bounds):
            return bool(g_lower < m_lower or g_upper > m_upper)
        if not _comparable(*bounds):
            return False
        below = torch.as_tensor(g_lower) < torch.as_tensor(m_lower)
        above = torch.as_tensor(g_upper) > torch.as_tensor(m_upper)
        return bool(below.any()) or bool(above.any())
    if isinstance(guide, tuple):  # the model's support is not an interval (simplex, ...)
        return not guide[2] and guide[0] == -math.inf and guide[1] == math.inf
    return False


def _describe(support: Any) -> str:
    if not isinstance(support, tuple):
        return repr(support)
    lower, upper, discrete = support
    kind = "integers" if discrete else "reals"

    if isinstance(lower, torch.Tensor):
        lower = lower.min().item()
    if isinstance(upper, torch.Tensor):
        upper = upper.max().item()
    return f"{kind} in [{lower:g}, {upper:g}]"
