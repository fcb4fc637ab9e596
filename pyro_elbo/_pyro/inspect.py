"""Model structure for the diagnostics: which factors a latent enters (and which guide densities
belong to it), non-finite data, the float32 rounding error of the log-weights measured against a
float64 re-evaluation, and a guide whose local sites get free per-data-point parameters (the
"optimal" guide of the amortization gap)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.ops.provenance import get_provenance
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import Independent, constraints, transform_to

from pyro_elbo._pyro.capture import reachable_modules
from pyro_elbo._pyro.log_weights import LogWeights, log_weights
from pyro_elbo._random import forked_rng
from pyro_elbo._typing import Guide, Model


def _latent(site: Any) -> bool:
    return bool(site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site))


@dataclass(frozen=True)
class SiteShares:
    """How the log-weight splits into one share per latent site.

    Attributes:
        model_sites: latent -> the model sites whose factor it enters (itself and its children).
        guide_sites: latent -> the guide sites of its density: itself and the auxiliary sites
            (e.g. an autoguide's ``z_unconstrained``) that only it depends on.
        joint: latent -> the auxiliary guide sites it shares with other latents (a joint guide
            such as ``AutoMultivariateNormal``): such a latent has no share of its own.
    """

    model_sites: dict[str, list[str]]
    guide_sites: dict[str, list[str]]
    joint: dict[str, list[str]]


def site_shares(model: Model, guide: Guide, args: tuple[Any, ...], kwargs: dict[str, Any]) -> SiteShares | None:
    """Each latent's share of the log-weight, via Pyro's provenance tracking on model and guide.

    ``None`` (with a warning) if the model or guide cannot be analysed."""
    try:
        from pyro.infer.inspect import TrackProvenance, get_dependencies

        with forked_rng(), poutine.block():
            deps: dict[str, Any] = get_dependencies(model, args, kwargs)["prior_dependencies"]  # type: ignore[assignment]
        with forked_rng(), poutine.block(), torch.no_grad():
            trace = poutine.trace(model).get_trace(*args, **kwargs)
        with forked_rng(), poutine.block(), torch.no_grad(), TrackProvenance():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        latent = [name for name, site in trace.nodes.items() if _latent(site)]
        uses = {z: _provenance(guide_trace.nodes[z]) for z in latent if z in guide_trace.nodes}
    except Exception as error:  # analysis is best effort; the report still has overall k-hat
        warnings.warn(f"per-site k-hat skipped: could not analyse the model's dependencies ({error})", stacklevel=3)
        return None
    auxiliary = [n for n, s in guide_trace.nodes.items() if _latent(s) and n not in trace.nodes]
    guide_sites = {z: [z] for z in latent}
    joint: dict[str, list[str]] = {}
    for aux in auxiliary:
        users = [z for z in latent if aux in uses.get(z, ())]
        if len(users) == 1:
            guide_sites[users[0]].append(aux)
        for z in users if len(users) > 1 else ():
            joint.setdefault(z, []).append(aux)
    model_sites = {z: [z] + [c for c, parents in deps.items() if c != z and z in parents] for z in latent}
    return SiteShares(model_sites, guide_sites, joint)


def _provenance(site: Any) -> frozenset[str]:
    """Names that a guide site's distribution (its parameters, value and density) depends on."""
    fn, names = site["fn"], set(get_provenance(site["value"]))
    while True:
        for value in vars(fn).values():
            if isinstance(value, Tensor):
                names |= get_provenance(value)
        if not hasattr(fn, "base_dist"):
            return frozenset(names)
        fn = fn.base_dist


def raise_if_nonfinite_observed(
    model: Model, guide: Guide, args: tuple[Any, ...], kwargs: dict[str, Any], caller: str = "this diagnostic"
) -> None:
    """Raise ``ValueError`` naming the first observed site whose (unmasked) data is ``inf``/``nan``.

    With such data every log-weight is ``-inf`` or ``nan``, and a report computed from them would
    read as an exact guide. The model runs once on its prior draws, or on the guide's if that
    fails (the random state is left untouched)."""
    with forked_rng(), poutine.block(), torch.no_grad():
        try:
            trace = poutine.trace(model).get_trace(*args, **kwargs)
        except Exception:
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    for name, site in trace.nodes.items():
        value = site.get("value")
        if site["type"] != "sample" or not site["is_observed"] or not isinstance(value, Tensor):
            continue
        if not value.is_floating_point() or site["mask"] is False:
            continue
        bad = ~torch.isfinite(value)
        mask = site["mask"]
        if isinstance(mask, Tensor):  # masked-out entries are not scored
            event = len(getattr(site["fn"], "event_shape", ()))
            reduced = bad.flatten(-event).any(-1) if event else bad
            bad = reduced & mask.bool()
        if bad.any():
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{caller}: observed site '{name}' has {int(bad.sum())} non-finite value(s) (inf or nan) in "
                f"its data, the first at index {first}; every log-weight would be -inf or nan, so no bound, "
                "k-hat or gradient means anything. Remove or impute them, or mask them out "
                "(poutine.mask / obs_mask)."
            )


def sizeless_plate_problems(model: Model, guide: Guide, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    """Why a plate without a size (``pyro.plate("data")``) cannot split the bound per data point:
    a site in it has one value for all points (one line per such plate, naming the sites and
    the fix). Empty when every size-less plate's size is read off its sites. One run of guide
    and model on the guide's draws (the random state is left untouched)."""
    from pyro_elbo._pyro.tracing import sizeless_plate_sizes

    try:
        with forked_rng(), poutine.block(), torch.no_grad():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    except Exception:  # noqa: BLE001 - the estimators report a failing program themselves
        return []
    _, why = sizeless_plate_sizes(model_trace, guide_trace)
    return [
        f"{reason}: every data point of the plate is merged into one. Give the plate its size "
        f"(pyro.plate('{plate}', N)) or move the shared site(s) out of it"
        for plate, reason in why.items()
    ]


class _Record(Messenger):
    """Keeps the first value of every latent site (the guide's draws)."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, Tensor] = {}
        self.edges: dict[str, tuple[int, int]] = {}

    def _pyro_post_sample(self, msg: Any) -> None:
        if _latent(msg) and msg["name"] not in self.values:
            self.values[msg["name"]] = msg["value"].detach()
            at_edge = _at_support_edge(msg["fn"], msg["value"].detach())
            if at_edge is not None:
                self.edges[msg["name"]] = (int(at_edge.sum()), at_edge.numel())


def _at_support_edge(fn: Any, value: Tensor) -> Tensor | None:
    """Which draws sit where the dtype ends the support (where torch clamps samples): ``[0, 1]``
    within ``eps`` of either end, a simplex with a component within ``eps`` of 1, a positive
    value at the smallest normal number. ``None`` for other supports or non-float values."""
    if not value.is_floating_point():
        return None
    support = getattr(fn, "support", None)
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    info = torch.finfo(value.dtype)
    if support is constraints.unit_interval:
        return (value <= info.eps) | (value >= 1 - info.eps)
    if support is constraints.simplex:
        return (value >= 1 - info.eps).any(-1)
    if support is constraints.positive:
        return value <= 2 * info.tiny
    return None


class _Replay(Messenger):
    """Replays recorded guide draws (the guide's pass only: the first time a site is seen), in
    float64 with the parameters upcast when ``upcast``. Delta sites (an autoguide's transformed
    value) are recomputed."""

    def __init__(self, values: dict[str, Tensor], upcast: bool = True) -> None:
        super().__init__()
        self.values, self.upcast = values, upcast
        self.seen: set[str] = set()

    def _pyro_post_param(self, msg: Any) -> None:
        if self.upcast and isinstance(msg["value"], Tensor) and msg["value"].is_floating_point():
            msg["value"] = msg["value"].double()

    def _pyro_sample(self, msg: Any) -> None:
        name = msg["name"]
        first = name not in self.seen
        self.seen.add(name)
        fn = msg["fn"]
        while hasattr(fn, "base_dist"):
            fn = fn.base_dist
        if first and _latent(msg) and name in self.values and type(fn).__name__ != "Delta":
            value = self.values[name]
            msg["value"] = value.double() if self.upcast and value.is_floating_point() else value


def _double(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.double() if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_double(v) for v in value)
    if isinstance(value, dict):
        return {k: _double(v) for k, v in value.items()}
    return value


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def float64_rounding_error(
    model: Model,
    guide: Guide,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    num_particles: int,
    max_plate_nesting: int,
    upcast: bool = True,
) -> Tensor | None:
    """``[K, *B]`` rounding error of ``K`` log-weights: the working-dtype value minus the value
    re-evaluated in float64 at the same guide draws (parameters, data and draws upcast).

    The draws are recorded and replayed by site name, which identifies a draw only within one run
    of the program: so the ``K`` particles are drawn in one particle plate, or, for a model that
    cannot take one, one particle per run (at most 16 runs), whatever path the log-weights took.

    The weights of ``nn.Module`` networks (those in the param store, as ``pyro.module`` and
    ``PyroModule`` put them there, and every module the programs reach) are upcast for the
    re-evaluation and put back after it. ``None`` if the program still cannot run in float64.

    With ``upcast=False`` the re-evaluation stays in the working dtype: a program whose
    log-density is a function of its sample sites' values gives exactly zero; anything else is
    randomness outside the sample sites (see :func:`outside_randomness`)."""
    check = rounding_check(model, guide, args, kwargs, num_particles, max_plate_nesting, upcast)
    return None if check is None else check.error


@dataclass(frozen=True)
class RoundingCheck:
    """The same draws evaluated twice: in the working dtype, and again (in float64, or in the
    same dtype to test that the program is a function of its draws).

    Attributes:
        error: ``[K, *B]`` first minus second log-weight.
        sites: ``"model site 'x'"`` / ``"guide site 'z'"`` -> ``[K, *B]`` first and second
            evaluation of that site's log-density (float64 tensors).
        edges: guide site -> (draws, of all) that sit where the working dtype ends the site's
            support (see :func:`support_edges`); only sites with such draws.
    """

    error: Tensor
    sites: dict[str, tuple[Tensor, Tensor]]
    edges: dict[str, tuple[int, int]] = field(default_factory=dict)


def rounding_check(
    model: Model,
    guide: Guide,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    num_particles: int,
    max_plate_nesting: int,
    upcast: bool = True,
) -> RoundingCheck | None:
    """:func:`float64_rounding_error` with each site's two evaluations; ``None`` if the second
    evaluation cannot run."""
    with forked_rng():
        try:
            pairs = [_rounding_error_once(model, guide, args, kwargs, num_particles, max_plate_nesting, upcast)]
        except Exception:  # noqa: BLE001 - no particle plate: one particle per run
            try:
                pairs = [
                    _rounding_error_once(model, guide, args, kwargs, 1, max_plate_nesting, upcast)
                    for _ in range(min(num_particles, 16))
                ]
            except Exception:  # best effort: the caller falls back to a floor derived from magnitudes
                return None
    present = [p for p in pairs if p is not None]
    if len(present) != len(pairs):
        return None
    error = torch.cat([_difference(low.log_w.double(), high.log_w.double()) for low, high, _ in present])
    edges: dict[str, tuple[int, int]] = {}
    for _, _, found in present:
        for name, (hits, total) in found.items():
            before = edges.get(name, (0, 0))
            edges[name] = (before[0] + hits, before[1] + total)
    sites: dict[str, tuple[Tensor, Tensor]] = {}
    for kind, field_name in (("model", "site_log_p"), ("guide", "site_log_q")):
        for name in getattr(present[0][0], field_name):
            try:
                first = torch.cat([getattr(low, field_name)[name].double() for low, _, _ in present])
                second = torch.cat([getattr(high, field_name)[name].double() for _, high, _ in present])
            except (KeyError, RuntimeError):  # a site that some runs lack: no per-site comparison
                continue
            sites[f"{kind} site '{name}'"] = (first, second)
    return RoundingCheck(error, sites, {name: e for name, e in edges.items() if e[0]})


def _difference(first: Tensor, second: Tensor) -> Tensor:
    """``first - second``, zero where both are the same infinity (a draw outside the model's
    support is ``-inf`` in every evaluation: no rounding error)."""
    return torch.where(first == second, torch.zeros_like(first), first - second)


#: a site's float32 log-density is wrong when it is off by more than this many nats and ...
PRECISION_NATS = 0.1
#: ... by more than this fraction of its float64 magnitude (plain rounding is ~1e-7 of it)
PRECISION_SHARE = 1e-3


def precision_losses(check: RoundingCheck) -> list[str]:
    """The sites whose working-dtype log-density is finite in float64 but not in the working
    dtype (underflow or overflow), or off by more than ``PRECISION_NATS`` and ``PRECISION_SHARE``
    of its magnitude; one line per site, naming it and the numbers."""
    found = []
    for site, (low, high) in check.sites.items():
        lost = torch.isfinite(high) & ~torch.isfinite(low)
        if lost.any():
            found.append(
                f"{site} is -inf/inf/nan in the working dtype at {int(lost.sum())} of {lost.numel()} "
                "particle values where float64 finds it finite (underflow or overflow)"
            )
            continue
        both = torch.isfinite(high) & torch.isfinite(low)
        if not both.any():
            continue
        error = float((low - high)[both].abs().max())
        size = float(high[both].abs().max())
        if error > PRECISION_NATS and error > PRECISION_SHARE * size:
            found.append(
                f"{site} is off by up to {error:.3g} nats (its float64 value is up to "
                f"{size:.3g} nats in size): cancellation or underflow inside its log-density"
            )
    return found


def support_edges(check: RoundingCheck, dtype: torch.dtype) -> list[str]:
    """One line per guide site some of whose draws sit where ``dtype`` ends the site's support
    (torch clamps a Beta draw to ``[eps, 1 - eps]``, a Gamma draw to ``tiny``): the guide's mass
    beyond lies on one value, so every bound computed from these draws is biased."""
    name = str(dtype).replace("torch.", "")
    return [
        f"guide site '{site}': {hits} of {total} draws sit at the edge of its support as {name} "
        "represents it (clamped): the guide puts mass where this dtype cannot, so the bounds are biased"
        for site, (hits, total) in check.edges.items()
    ]


@contextlib.contextmanager
def float64_program(programs: tuple[Any, ...]) -> Iterator[None]:
    """Run the programs in float64: default dtype, param store and reachable modules upcast (put
    back on exit). Arguments are upcast with :func:`as_float64`."""
    with _default_dtype(torch.float64), _weights_in_float64(programs):
        yield


def as_float64(value: Any) -> Any:
    """Floating tensors (also inside lists, tuples and dicts) upcast to float64."""
    return _double(value)


#: module types whose output in training mode is random (dropout) or depends on the whole batch
#: (batch normalization): a log-density through them is not a function of the sample sites
_TRAINING_MODE_TYPES: tuple[type[torch.nn.Module], ...] = (
    torch.nn.modules.dropout._DropoutNd,
    torch.nn.AlphaDropout,
    torch.nn.FeatureAlphaDropout,
    torch.nn.modules.batchnorm._BatchNorm,
    torch.nn.RReLU,
)


def outside_randomness(model: Model, guide: Guide, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    """Modules in training mode that make a program random beyond its sample sites, by name.

    The modules that run during one pass of guide and model are recorded (a global forward
    hook); those of a dropout or batch-norm type in training mode are named by their path from
    the outermost module that ran, itself named as ``pyro.module`` registered it in the param
    store (``"encoder.drop"``), or by its class. Empty if none is found (the randomness may then
    come from ``torch.rand``-style calls outside ``pyro.sample``)."""
    ran: dict[int, torch.nn.Module] = {}

    def hook(module: torch.nn.Module, inputs: Any) -> None:
        ran[id(module)] = module

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        with forked_rng(), poutine.block(), torch.no_grad():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            poutine.replay(model, trace=guide_trace)(*args, **kwargs)
    except Exception:  # noqa: BLE001 - naming is best effort; the caller still reports the randomness
        pass
    finally:
        handle.remove()
    inner = {id(sub) for m in ran.values() for sub in m.modules() if sub is not m}
    roots = [m for key, m in ran.items() if key not in inner]
    store = {id(p): name for name, p in pyro.get_param_store().named_parameters()}
    names: list[str] = []
    for root in roots:
        prefix = type(root).__name__
        for p in root.parameters():
            if id(p) in store and "$$$" in store[id(p)]:
                prefix = store[id(p)].split("$$$")[0]
                break
        for path, sub in root.named_modules():
            if sub.training and isinstance(sub, _TRAINING_MODE_TYPES):
                names.append(f"{type(sub).__name__} at {prefix + ('.' + path if path else '')}")
    return names


@contextlib.contextmanager
def _weights_in_float64(programs: tuple[Any, ...]) -> Iterator[None]:
    """Every floating tensor of the param store and every parameter and buffer of the modules the
    programs reach, upcast to float64 in place (``.data`` swapped, so modules compute in float64),
    and put back on exit, whatever happened in between (running statistics included)."""
    tensors = {id(t): t for _, t in pyro.get_param_store().named_parameters()}
    for module in reachable_modules(programs):
        tensors.update((id(t), t) for t in (*module._parameters.values(), *module._buffers.values()) if t is not None)
    saved = [(t, t.data) for t in tensors.values() if t.is_floating_point() and t.dtype != torch.float64]
    try:
        for tensor, data in saved:
            tensor.data = data.double()
        yield
    finally:
        for tensor, data in saved:
            tensor.data = data


def _rounding_error_once(
    model: Model,
    guide: Guide,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    num: int,
    max_plate_nesting: int,
    upcast: bool = True,
) -> tuple[LogWeights, LogWeights, dict[str, tuple[int, int]]] | None:
    """The log-weights (per site too) of ``num`` particles, and again at the same draws; and
    guide site -> (draws at the edge of the dtype's support, draws)."""
    with poutine.block(), torch.no_grad():
        record = _Record()
        with record:
            low = log_weights(
                model,
                guide,
                *args,
                num_particles=num,
                max_plate_nesting=max_plate_nesting,
                vectorize_particles="plate",
                need={"per_site"},
                **kwargs,
            )
        if upcast:
            with _default_dtype(torch.float64), _Replay(record.values), _weights_in_float64((model, guide)):
                high = log_weights(
                    model,
                    guide,
                    *_double(args),
                    num_particles=num,
                    max_plate_nesting=max_plate_nesting,
                    vectorize_particles="plate",
                    need={"per_site"},
                    **_double(kwargs),
                )
        else:
            with _Replay(record.values, upcast=False):
                high = log_weights(
                    model, guide, *args, num_particles=num, max_plate_nesting=max_plate_nesting,
                    vectorize_particles="plate", need={"per_site"}, **kwargs,
                )  # fmt: skip
    if (upcast and high.log_w.dtype != torch.float64) or high.log_w.shape != low.log_w.shape:
        return None
    return low, high, record.edges


class FreeLocalGuide(Messenger):
    """Runs a guide with each local site's distribution replaced by the same family with free
    per-data-point parameters (initialized from one run of the amortized guide)."""

    def __init__(self, guide: Guide, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.guide = guide
        with torch.no_grad(), forked_rng():
            trace = poutine.trace(guide).get_trace(*args, **kwargs)
        self.sites: dict[str, tuple[Callable[..., Any], dict[str, Tensor]]] = {}
        self._params: list[Tensor] = []
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
                continue
            build, free = _free_parameters(name, site["fn"])
            self.sites[name] = (build, free)
            self._params.extend(free.values())

    def parameters(self) -> list[Tensor]:
        return self._params

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self:
            return self.guide(*args, **kwargs)

    def _pyro_sample(self, msg: Any) -> None:
        if msg["name"] in self.sites and not msg["is_observed"]:
            build, free = self.sites[msg["name"]]
            fn = build(free)
            target = msg["fn"].batch_shape
            msg["fn"] = fn.expand(torch.broadcast_shapes(fn.batch_shape, target)) if fn.batch_shape != target else fn


_FREE_PARAMS = (
    "loc",
    "scale",
    "scale_tril",
    "logits",
    "concentration",
    "rate",
    "concentration1",
    "concentration0",
    "df",
)


def _free_parameters(name: str, fn: Any) -> tuple[Callable[[dict[str, Tensor]], Any], dict[str, Tensor]]:
    """Unconstrained free copies of a distribution's parameters and a function rebuilding it."""
    if isinstance(fn, Independent):
        build_base, free = _free_parameters(name, fn.base_dist)
        ndims = fn.reinterpreted_batch_ndims
        return (lambda p: Independent(build_base(p), ndims)), free
    if isinstance(fn, pyro.distributions.MultivariateNormal):
        values = {"loc": fn.loc, "scale_tril": fn.scale_tril}
    else:
        values = {k: getattr(fn, k) for k in _FREE_PARAMS if k in fn.arg_constraints and k in vars(fn)}
    if not values:
        raise NotImplementedError(
            f"gap_decomposition cannot free the parameters of site '{name}' ({type(fn).__name__}); "
            f"supported parameters: {', '.join(_FREE_PARAMS)}"
        )
    cons = {k: fn.arg_constraints[k] for k in values}
    free = {
        k: transform_to(cons[k]).inv(v.detach().clone()).requires_grad_()
        if cons[k] is not constraints.real
        else v.detach().clone().requires_grad_()
        for k, v in values.items()
    }
    cls = type(fn)

    def build(p: Mapping[str, Tensor]) -> Any:
        return cls(**{k: transform_to(cons[k])(p[k]) for k in values}, validate_args=False)

    return build, free
