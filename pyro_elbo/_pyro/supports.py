"""Does the guide draw only values the model can score? Support comparison per latent site.

The bound :math:`\\mathbb{E}_q[\\log p(x, z) - \\log q(z)]` is finite only when
:math:`\\operatorname{supp} q \\subseteq \\operatorname{supp} p`. Where the guide's support is
*wider* (a ``LogNormal`` guide for a ``Uniform(0, 10)`` latent, a ``Normal`` guide for a
``HalfCauchy`` one), :math:`q` puts mass where :math:`p(x, z) = 0`, so
:math:`\\mathrm{KL}(q \\,\\|\\, p(z \\mid x)) = \\infty` and the ELBO (and every training objective of
the IWAE family) is :math:`-\\infty` in expectation; yet each draw inside the model's support gives
the usual value, which is how Pyro's ``Trace_ELBO`` trains such a guide. So a wider support is
warned about once per site (:class:`SupportWarning`), and a draw that lands outside is scored
:math:`\\log p = -\\infty` (:func:`log_prob_outside_support`), a non-finite loss that the training
loop's non-finite policy names. Importance-sampling estimates of :math:`\\log p(x)` stay valid
(the weights outside are zero); :func:`~pyro_elbo.kl_gap` reports the KL as infinite.

A guide support *narrower* than the model's is valid for training (every draw can be scored),
but its draws cannot see posterior mass outside it: :func:`~pyro_elbo.kl_gap` then keeps only the
lower ends of its bracket (:func:`support_differences` names both kinds).

A guide support that meets the model's only in a set of measure zero (a continuous guide for a
discrete latent, an unconstrained guide for a simplex, or intervals that do not overlap) draws
outside almost surely: that pair is refused with a ``ValueError``.

A support is read from ``site["fn"].support`` after unwrapping ``independent`` (event dims do not
change the set of values per element). Where a guide is a ``TransformedDistribution`` the support is
pushed forward through its transforms, because ``AffineTransform`` declares ``real`` as its codomain
even when it maps ``(0, 1)`` onto ``(a, b)`` (this is how ``biject_to(interval(a, b))`` is built,
used by the Messenger autoguides). Point-mass guide sites (``Delta``: ``AutoDelta`` and the sites
``AutoNormal``/``AutoContinuous`` guides push forward from their latent) are not compared: their
nominal support is ``real`` and their value is checked by the model's own ``log_prob`` validation.

Only provable widenings are warned about or refused; a pair of supports this module cannot compare
passes.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pyro.poutine as poutine
import torch
from pyro.infer.util import is_validation_enabled
from torch import Tensor
from torch.distributions import constraints
from torch.distributions import constraints as C
from torch.distributions.transforms import AffineTransform, ComposeTransform, Transform

from pyro_elbo._pyro._sites import is_deterministic, sample_sites
from pyro_elbo._random import forked_rng

#: ``(lower, upper, discrete)``: an interval of the reals (bounds may be tensors), or of the integers.
Interval = tuple[Any, Any, bool]


class SupportWarning(UserWarning):
    """A guide site can draw values outside its model site's support (said once per site and pair
    of supports): the KL to the posterior is infinite and the ELBO is :math:`-\\infty` in expectation."""


#: (site, guide support, model support) already warned about
_warned: set[tuple[str, str, str]] = set()


def check_supports(model_trace: Any, guide_trace: Any) -> tuple[str, ...]:
    """Compare every latent site present in both traces; return the sites whose guide support is wider.

    A guide support wider than the model's (but overlapping it) is warned about once per site
    (:class:`SupportWarning`); one that meets the model's only in a set of measure zero is
    refused. Guide sites that are observed, auxiliary or point masses are skipped. A pure function
    of the two traces apart from the warning: it may be called once per model/guide pair.

    Returns:
        The names of the sites whose guide support is provably wider than the model's.

    Raises:
        ValueError: a guide site that draws outside its model site's support almost surely,
            naming the site, both supports and the usual fixes.
    """
    wider: list[str] = []
    for name, model_support, guide_support, model_fn, guide_fn in _compared_sites(model_trace, guide_trace):
        relation = _relation(guide_support, model_support)
        if relation not in ("wider", "disjoint"):
            continue  # a narrower guide: every draw can be scored (kl_gap says what it cannot see)
        described = (
            f"Guide site '{name}' has support {_describe(guide_support)}, "
            + ("wider than" if relation == "wider" else "almost surely outside")
            + f" the model's {_describe(model_support)} (model distribution {type(_base(model_fn)).__name__}, "
            f"guide {type(_base(guide_fn)).__name__})"
        )
        fix = (
            "Use a guide distribution on the model's support (e.g. LogNormal or Gamma for a positive latent, "
            "Beta for (0, 1)), transform an unconstrained draw with biject_to(model support), or an autoguide "
            "such as AutoNormal, which transforms into the model's support."
        )
        if relation == "disjoint":
            raise ValueError(
                f"{described}: almost every draw is a value the model cannot score, so the bound is meaningless. {fix}"
            )
        wider.append(name)
        key = (name, _describe(guide_support), _describe(model_support))
        if key in _warned:
            continue
        _warned.add(key)
        warnings.warn(
            f"{described}: the guide puts mass where the model's density is zero, so KL(q || p(z | x)) is "
            "infinite and the ELBO (and the IWAE, DReG and STL objectives) is -inf in expectation. Each draw "
            "inside the model's support gives the usual value, as in Pyro's Trace_ELBO; a draw outside scores "
            "log p = -inf, a non-finite loss that training names (on_nonfinite). Importance-sampling "
            "estimates of log p(x) (log_evidence, IWAE) stay valid; kl_gap reports the KL as infinite. "
            f"{fix}",
            SupportWarning,
            stacklevel=2,
        )
    return tuple(wider)


def support_differences(
    model: Any, guide: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[list[str], list[str]]:
    """The latent sites whose guide support is provably wider, and those where it is provably
    narrower, than the model's: one line per site naming both supports.

    Runs guide and model once (one particle, without gradients, under
    :func:`~pyro_elbo._random.forked_rng` and ``poutine.block``, so the caller's random stream and
    handlers are untouched) and compares their sites as :func:`check_supports` does, without
    warning. ``([], [])`` if the run fails (the caller's own run says why).
    """
    with forked_rng(), torch.no_grad(), poutine.block():
        try:
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        except Exception:  # noqa: BLE001 - the caller's own evaluation raises it, with its context
            return [], []
    found: dict[str, list[str]] = {"wider": [], "narrower": []}
    for name, model_support, guide_support, _, _ in _compared_sites(model_trace, guide_trace):
        relation = _relation(guide_support, model_support)
        if relation in found:
            found[relation].append(
                f"guide site '{name}' has support {_describe(guide_support)}, {relation} than the model's "
                f"{_describe(model_support)}"
            )
    return found["wider"], found["narrower"]


def draws_outside(model_trace: Any, guide_trace: Any) -> str | None:
    """Why the model failed on the guide's values, where a guide site with a wider support drew
    outside the model site's support (e.g. a negative draw used as a scale); else ``None``."""
    for name, model_support, guide_support, model_fn, _ in _compared_sites(model_trace, guide_trace):
        value = sample_sites(guide_trace)[name]["value"]
        constraint = _unwrap(model_fn.support)
        if _relation(guide_support, model_support) != "wider" or not isinstance(value, Tensor):
            continue
        try:
            inside = constraint.check(value)
        except (RuntimeError, ValueError, TypeError):
            continue
        if inside.shape != value.shape or bool(inside.all()):
            continue
        outside = value[~inside]
        return (
            f"Guide site '{name}' drew {float(outside.flatten()[0]):.4g} ({outside.numel()} of {value.numel()} "
            f"values), outside the model's support {_describe(model_support)}: its support "
            f"{_describe(guide_support)} is wider than the model's, and the model cannot run on such a value "
            "(Pyro's Trace_ELBO fails the same way). Use a guide distribution on the model's support (e.g. "
            "LogNormal or Gamma for a positive latent, Beta for (0, 1)), or an autoguide such as AutoNormal, "
            "which transforms into it."
        )
    return None


def _compared_sites(model_trace: Any, guide_trace: Any) -> list[tuple[str, Any, Any, Any, Any]]:
    """``(name, model support, guide support, model fn, guide fn)`` of every comparable latent site."""
    model_sites = sample_sites(model_trace)
    found = []
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
        found.append((name, model_support, guide_support, model_site["fn"], guide_site["fn"]))
    return found


def log_prob_outside_support(fn: Any, value: Tensor) -> Tensor | None:
    """``fn.log_prob(value)`` with :math:`-\\infty` wherever ``value`` is outside ``fn``'s support.

    For a model site whose ``log_prob`` refused a value (distribution validation) because a guide
    with a wider support drew it outside: the density there is zero. The value outside is replaced
    by a point inside before ``log_prob`` (so no ``nan`` reaches the gradient), and its log-density
    set to :math:`-\\infty`. ``None`` when every value is inside, or the support is not an
    interval of the reals or integers (the caller raises the validation error).
    """
    constraint = _unwrap(fn.support)
    interval = _interval(constraint)
    if interval is None or constraint.event_dim != 0 or not isinstance(value, Tensor):
        return None
    inside = constraint.check(value)
    if bool(inside.all()):
        return None
    lower, upper = (torch.as_tensor(b, dtype=value.dtype, device=value.device) for b in interval[:2])
    discrete = interval[2]
    with torch.no_grad():
        low_ok, high_ok = torch.isfinite(lower), torch.isfinite(upper)
        one = torch.zeros_like(lower) if discrete else torch.ones_like(lower)
        point = torch.where(
            low_ok & high_ok,
            lower if discrete else (lower + upper) / 2,
            torch.where(low_ok, lower + one, torch.where(high_ok, upper - one, torch.zeros_like(lower))),
        )
    log_prob = fn.log_prob(torch.where(inside, value, point))
    event_dims = len(fn.event_shape)
    inside_all = inside.reshape(inside.shape[: inside.dim() - event_dims] + (-1,)).all(-1) if event_dims else inside
    return torch.where(inside_all, log_prob, torch.full_like(log_prob, -math.inf))


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


def _relation(guide: Any, model: Any) -> str | None:
    """``"wider"`` if the guide's support provably overlaps the model's and extends beyond it,
    ``"disjoint"`` if they provably meet at most in a set of measure zero, ``"narrower"`` if it is
    provably inside the model's and not all of it, else ``None``."""
    if isinstance(guide, tuple) and isinstance(model, tuple):
        g_lower, g_upper, g_discrete = guide
        m_lower, m_upper, m_discrete = model
        if m_discrete and not g_discrete:
            return "disjoint"  # a continuous guide for a discrete latent
        if g_discrete and not m_discrete:
            return None  # a pmf against a density: not a support question
        bounds = (g_lower, g_upper, m_lower, m_upper)
        if all(not isinstance(v, torch.Tensor) for v in bounds):  # plain numbers: no tensor op while tracing
            apart = g_upper < m_lower or g_lower > m_upper if g_discrete else g_upper <= m_lower or g_lower >= m_upper
            low_tol, up_tol = _tolerance(m_lower), _tolerance(m_upper)
            wider = g_lower < m_lower - low_tol or g_upper > m_upper + up_tol
            narrower = g_lower > m_lower + low_tol or g_upper < m_upper - up_tol
        elif _comparable(*bounds):
            gl, gu, ml, mu = (torch.as_tensor(v) for v in bounds)
            apart = bool(((gu < ml) | (gl > mu) if g_discrete else (gu <= ml) | (gl >= mu)).any())
            ml_tol = torch.where(torch.isfinite(ml), 1e-6 * (1 + ml.abs()), torch.zeros_like(ml))
            mu_tol = torch.where(torch.isfinite(mu), 1e-6 * (1 + mu.abs()), torch.zeros_like(mu))
            wider = bool((gl < ml - ml_tol).any() or (gu > mu + mu_tol).any())
            narrower = bool((gl > ml + ml_tol).any() or (gu < mu - mu_tol).any())
        else:
            return None
        return "disjoint" if apart else "wider" if wider else "narrower" if narrower else None
    if isinstance(guide, tuple):  # the model's support is not an interval (simplex, ...)
        unconstrained = not guide[2] and guide[0] == -math.inf and guide[1] == math.inf
        return "disjoint" if unconstrained else None
    return None


def _tolerance(bound: float) -> float:
    """Bounds this close are equal: a guide's pushed-forward bound (``a + (b - a) * 1``) differs
    from the model's by rounding."""
    return 1e-6 * (1 + abs(bound)) if math.isfinite(bound) else 0.0


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
