"""Per-data-point log evidence of held-out or simulated data: IWAE, AIS and BDMC sandwiches.

For a model whose batch plate (``"data"``) encloses every site, the evidence factorizes,
:math:`\\log p(x_{1:N}) = \\sum_i \\log p(x_i)`, and each term is estimated on its own:

* ``method="iwae"``: :math:`\\log \\frac1K \\sum_k p(x_i, z_k)/q(z_k \\mid x_i)`,
  :math:`z_k \\sim q`: the test log-likelihood VAE papers report (K = 5000).
* ``method="ais"``: annealed importance sampling from ``q`` to :math:`p(z \\mid x_i)` (see
  :mod:`pyro_elbo.ais`): tighter than IWAE at equal cost when the guide is poor.

Both are stochastic lower bounds: their exponentials are unbiased for :math:`p(x_i)`.
:func:`bdmc` adds a stochastic upper bound on data simulated from the model.

References:
    | Importance Weighted Autoencoders (Burda et al., 2016)
    | https://arxiv.org/abs/1509.00519
    | Annealed Importance Sampling (Neal, 2001)
    | https://arxiv.org/abs/physics/9803008
    | On the Quantitative Analysis of Decoder-Based Generative Models (Wu et al., 2017)
    | https://arxiv.org/abs/1611.04273
    | Sandwiching the marginal likelihood using bidirectional Monte Carlo (Grosse et al., 2015)
    | https://arxiv.org/abs/1511.02543
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pyro_elbo import ais
from pyro_elbo._estimate import Estimate
from pyro_elbo._pyro.density import JointDensity, Observed, conditioned, guide_reads_data, simulate
from pyro_elbo._pyro.guide_plates import plates_of_model
from pyro_elbo._pyro.inspect import sizeless_plate_problems
from pyro_elbo._pyro.observed_plates import observed_per_point
from pyro_elbo._typing import Guide, Model
from pyro_elbo.weights import log_weights

METHODS = ("iwae", "ais")
TRANSITIONS = {"hmc": 0.65, "mala": 0.57}  # target acceptance rates


@dataclass(frozen=True)
class Evidence:
    """Per-data-point estimates of :math:`\\log p(x_i)`.

    Attributes:
        per_point: ``[N]`` estimates, one per element of the batch plates (flattened row-major;
            ``[1]`` for a model without a batch plate: the whole data set is one point).
        per_point_se: ``[N]`` their Monte Carlo standard errors (delta method over the particles;
            they measure noise, not the downward bias of a lower bound).
        total: :math:`\\sum_i` of ``per_point``, with :math:`\\mathrm{se} = \\sqrt{\\sum_i \\mathrm{se}_i^2}`.
        method: ``"iwae"``, ``"ais"`` or ``"reverse-ais"`` (an upper bound).
        num_particles: particles (IWAE) or chains (AIS) per data point.
        num_evals: model evaluations per data point, every particle, chain and pilot included.
        observed: observed scalars per data point and whether they are discrete.
        acceptance_rate: ``[N]`` mean HMC acceptance probability (AIS only).
        step_size: ``[T, N]`` the step sizes of the AIS transitions (AIS only).
        effective_chains: ``[N]`` :math:`(\\sum w)^2 / \\sum w^2` of the chains' weights (AIS only):
            when a few chains carry the weight, ``per_point_se`` understates the error.
    """

    per_point: Tensor
    per_point_se: Tensor
    total: Estimate
    method: str
    num_particles: int
    num_evals: int
    observed: Observed
    acceptance_rate: Tensor | None = None
    step_size: Tensor | None = None
    effective_chains: Tensor | None = None

    @property
    def mean(self) -> Estimate:
        """The mean over data points of ``per_point``."""
        n = len(self.per_point)
        return Estimate(self.total.value / n, self.total.se / n)

    @property
    def bits_per_dim(self) -> Estimate | None:
        """:math:`-\\overline{\\log p(x_i)} / (D \\log 2)` for discrete observations of ``D``
        scalars per point (the negative log-likelihood in bits per dimension), else ``None``."""
        if not self.observed.discrete or self.observed.dims == 0:
            return None
        mean, scale = self.mean, self.observed.dims * math.log(2)
        return Estimate(-mean.value / scale, mean.se / scale)

    def __str__(self) -> str:
        lines = [
            f"log_evidence ({self.method}, {self.num_particles} per point, {self.num_evals} evals/point)",
            f"  points        {len(self.per_point)}",
            f"  total         {self.total}",
            f"  per point     {self.mean}",
        ]
        if self.bits_per_dim is not None:
            lines.append(f"  bits/dim      {self.bits_per_dim}")
        if self.acceptance_rate is not None:
            lines.append(f"  acceptance    {float(self.acceptance_rate.mean()):.3f}")
        return "\n".join(lines)


def _evidence(
    per_point: Tensor, se: Tensor, method: str, num: int, evals: int, observed: Observed, **extra: Any
) -> Evidence:
    per_point, se = per_point.detach().reshape(-1), se.detach().reshape(-1)
    total = Estimate(float(per_point.sum()), float(se.pow(2).sum().sqrt()))
    return Evidence(per_point, se, total, method, num, evals, observed, **extra)


def log_evidence(
    model: Model,
    guide: Guide,
    *args: Any,
    num_particles: int = 1000,
    method: str = "iwae",
    chunk_size: int = 1000,
    num_steps: int = 100,
    num_leapfrog: int = 5,
    transition: str = "hmc",
    step_size: float = 0.5,
    num_pilot_chains: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    **kwargs: Any,
) -> Evidence:
    """Estimate :math:`\\log p(x_i)` for every data point of the batch plate.

    ``args`` are the model's arguments, or a single ``DataLoader`` whose batches are (tuples
    of) them; the results of the batches are concatenated. Particles (IWAE) or chains (AIS) are
    drawn ``chunk_size`` at a time, without gradients in the model's parameters, on the device
    of the data (or ``device``, where each batch is moved).

    With ``method="ais"``, ``num_particles`` chains anneal through ``num_steps`` temperatures
    (sigmoid schedule); each transition is HMC with ``num_leapfrog`` steps (``transition="mala"``:
    one step) and a diagonal mass matrix from 64 guide draws. Step sizes start at ``step_size``
    (in units of the guide's spread) and are tuned per data point and temperature in a pilot run
    of ``num_pilot_chains`` chains (default ``max(2, num_particles // 4)``), then frozen. Its cost
    is counted in ``num_evals``.

    The IWAE estimate stays valid for a guide whose support is wider than the model's (a draw
    outside has weight zero). An autoguide built on subsamples is evaluated on each batch given,
    with its plates opened at the model's sizes (:mod:`~pyro_elbo._pyro.guide_plates`).

    Returns:
        An :class:`Evidence` with ``per_point`` ``[N]``, ``per_point_se``, ``total`` and, for
        discrete observations, ``bits_per_dim``.

    Raises:
        ValueError: on an unknown method or transition, a subsampled plate, or (AIS) a discrete
            latent site, named.

    Example:
        >>> ev = log_evidence(model, guide, test_images, num_particles=5000)  # doctest: +SKIP
        >>> ev.bits_per_dim
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if transition not in TRANSITIONS:
        raise ValueError(f"unknown transition {transition!r}; choose from {tuple(TRANSITIONS)}")
    if num_particles < 1 or chunk_size < 1:
        raise ValueError(f"num_particles and chunk_size must be >= 1, got {num_particles}, {chunk_size}")
    options: dict[str, Any] = dict(
        num_particles=num_particles,
        chunk_size=chunk_size,
        num_steps=num_steps,
        num_leapfrog=1 if transition == "mala" else num_leapfrog,
        target_accept=TRANSITIONS[transition],
        step_size=step_size,
        num_pilot_chains=num_pilot_chains or max(2, num_particles // 4),
    )
    batches = _batches(args, device)
    results = []
    warned = False
    bar = _progress_bar(progress, len(args[0]) if _is_loader(args) else 1)
    for batch in batches:
        with plates_of_model(model, guide, batch, kwargs):  # an autoguide built on subsamples: this batch's plates
            for problem in [] if warned else sizeless_plate_problems(model, guide, batch, kwargs):
                warnings.warn(f"log_evidence: {problem}", stacklevel=2)
            warned = True
            if method == "iwae":
                results.append(_iwae(model, guide, batch, kwargs, **options))
            else:
                results.append(_ais(model, guide, batch, kwargs, **options)[0])
        bar.update(1)
    bar.close()
    return _concat(results)


def _is_loader(args: tuple[Any, ...]) -> bool:
    return len(args) == 1 and isinstance(args[0], torch.utils.data.DataLoader)


def _batches(args: tuple[Any, ...], device: str | torch.device | None) -> Iterable[tuple[Any, ...]]:
    def move(batch: tuple[Any, ...]) -> tuple[Any, ...]:
        if device is None:
            return batch
        return tuple(a.to(device) if isinstance(a, Tensor) else a for a in batch)

    if not _is_loader(args):
        yield move(args)
        return
    for batch in args[0]:
        yield move(tuple(batch) if isinstance(batch, (tuple, list)) else (batch,))


def _progress_bar(enabled: bool, total: int) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm  # type: ignore[import-untyped]

    return tqdm(total=total, desc="log_evidence", unit="batch", dynamic_ncols=True)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _concat(results: list[Evidence]) -> Evidence:
    first = results[0]
    if len(results) == 1:
        return first

    def cat(name: str, dim: int = 0) -> Tensor | None:
        parts = [getattr(r, name) for r in results]
        return None if parts[0] is None else torch.cat(parts, dim)

    return _evidence(
        cat("per_point"),  # type: ignore[arg-type]
        cat("per_point_se"),  # type: ignore[arg-type]
        first.method,
        first.num_particles,
        first.num_evals,
        first.observed,
        acceptance_rate=cat("acceptance_rate"),
        step_size=cat("step_size", 1),
        effective_chains=cat("effective_chains"),
    )


def _iwae(
    model: Model,
    guide: Guide,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    num_particles: int,
    chunk_size: int,
    **_: Any,
) -> Evidence:
    """Streaming IWAE: running log-sum-exps of ``log w`` and ``2 log w`` per data point."""
    lse1: Tensor | None = None
    lse2: Tensor | None = None
    done = 0
    with torch.no_grad():
        while done < num_particles:
            k = min(chunk_size, num_particles - done)
            log_w = log_weights(model, guide, *args, num_particles=k, **kwargs).log_w
            log_w = log_w.reshape(k, -1)
            a, b = torch.logsumexp(log_w, 0), torch.logsumexp(2 * log_w, 0)
            lse1 = a if lse1 is None else torch.logaddexp(lse1, a)
            lse2 = b if lse2 is None else torch.logaddexp(lse2, b)
            done += k
    assert lse1 is not None and lse2 is not None
    per_point = lse1 - math.log(num_particles)
    if num_particles > 1:  # var(w) / mean(w)^2 from the sums of w and w^2
        ratio = (num_particles * torch.exp(lse2 - 2 * lse1) - 1).clamp(min=0) * num_particles / (num_particles - 1)
        se = (ratio / num_particles).sqrt()
    else:
        se = torch.full_like(per_point, math.nan)
    return _evidence(
        per_point,
        se,
        "iwae",
        num_particles,
        num_particles,
        observed_per_point(model, guide, args, kwargs, per_point.numel()),
    )


def _guide_scale(model: Model, guide: Guide, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ais.Sites:
    """Per-element standard deviation of the unconstrained latents under the guide (64 draws)."""
    draws = JointDensity(model, guide, args, kwargs, 64).sample()
    return {k: v.std(0, keepdim=True).clamp(min=1e-8) for k, v in draws.items()}


def _ais(
    model: Model,
    guide: Guide,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    num_particles: int,
    chunk_size: int,
    num_steps: int,
    num_leapfrog: int,
    target_accept: float,
    step_size: float,
    num_pilot_chains: int,
) -> tuple[Evidence, ais.Sites, Tensor]:
    """Forward AIS in chunks of chains; returns the evidence, the scales and the step schedule."""
    betas = ais.sigmoid_schedule(num_steps)
    scale = _guide_scale(model, guide, args, kwargs)
    pilot = JointDensity(model, guide, args, kwargs, num_pilot_chains)
    eps0 = torch.full(pilot.batch_shape, float(step_size), device=next(iter(scale.values())).device)
    tuned = ais.anneal(
        pilot, pilot.sample(), betas, eps0, scale, num_leapfrog=num_leapfrog, adapt=True, target_accept=target_accept
    )
    log_ws, accepts = [], []
    done = 0
    while done < num_particles:
        target = JointDensity(model, guide, args, kwargs, min(chunk_size, num_particles - done))
        run = ais.anneal(target, target.sample(), betas, tuned.step_size, scale, num_leapfrog=num_leapfrog)
        log_ws.append(run.log_w)
        accepts.append(run.acceptance.mean(0) * run.log_w.shape[0])
        done += run.log_w.shape[0]
    log_w = torch.cat(log_ws)
    evals = (num_particles + num_pilot_chains) * tuned.num_evals + 64
    evidence = _evidence(
        ais.logmeanexp(log_w),
        ais.log_mean_se(log_w),
        "ais",
        num_particles,
        evals,
        target.observed,
        acceptance_rate=(torch.stack(accepts).sum(0) / num_particles).reshape(-1),
        effective_chains=ais.effective_chains(log_w).reshape(-1),
        step_size=tuned.step_size.reshape(num_steps, -1),
    )
    return evidence, scale, tuned.step_size


@dataclass(frozen=True)
class Sandwich:
    """A BDMC sandwich of :math:`\\log p(x^*)` on data simulated from the model.

    Attributes:
        lower: forward-AIS total (a stochastic lower bound), with its standard error.
        upper: reverse-AIS total from the exact latents (a stochastic upper bound).
        forward, reverse: the per-point results (``reverse.per_point`` are upper bounds).
        latents: the simulated latents :math:`z^*`, by site.
        observed: the simulated observations :math:`x^*`, by site.
    """

    lower: Estimate
    upper: Estimate
    forward: Evidence
    reverse: Evidence
    latents: dict[str, Tensor] = field(repr=False)
    observed: dict[str, Tensor] = field(repr=False)

    @property
    def width(self) -> float:
        """``upper - lower``: how far the bounds are from the truth, at most."""
        return self.upper.value - self.lower.value

    def __str__(self) -> str:
        n = len(self.forward.per_point)
        return (
            f"BDMC on {n} simulated points: log p(x*) in [{self.lower}, {self.upper}], "
            f"width {self.width:.4f} ({self.width / n:.4f} per point)"
        )


@dataclass(frozen=True)
class Simulated:
    """Data simulated from the model, ready to score.

    Attributes:
        model: the model with its observed sites conditioned on :math:`x^*`.
        args, kwargs: the model's (and guide's) arguments with the data replaced by :math:`x^*`.
        latents: :math:`z^*`, by site (an exact draw from :math:`p(z \\mid x^*)`).
        observed: :math:`x^*`, by site.
        guide_sees_data: whether the guide draws differently on :math:`x^*` than on the real data
            from the same random state (an amortized guide), rather than being fit to the data.
    """

    model: Model
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    latents: dict[str, Tensor] = field(repr=False)
    observed: dict[str, Tensor] = field(repr=False)
    guide_sees_data: bool


def simulate_data(
    model: Model,
    guide: Guide,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    simulate_args: Callable[[dict[str, Tensor]], tuple[Any, ...]] | None = None,
) -> Simulated:
    """Draw :math:`(z^*, x^*) \\sim p(z)\\,p(x \\mid z)` at the current parameters and swap
    :math:`x^*` in for the data: every positional or keyword argument that *is* (the same tensor
    object as) an observed site's ``obs``, or the positional arguments ``simulate_args(x*)``;
    ``guide_sees_data`` says whether the guide's draws change with it."""
    latents, observed, original = simulate(model, args, kwargs)
    if simulate_args is not None:
        new_args, new_kwargs = tuple(simulate_args(observed)), dict(kwargs)
    else:
        swap = {id(original[name]): observed[name] for name in observed}
        new_args = tuple(swap.get(id(a), a) for a in args)
        new_kwargs = {k: swap.get(id(v), v) for k, v in kwargs.items()}
    sees = guide_reads_data(guide, args, kwargs, new_args, new_kwargs)
    return Simulated(conditioned(model, observed), new_args, new_kwargs, latents, observed, sees)


def check_bdmc(model: Model, guide: Guide, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Raise the error BDMC would raise (a discrete latent, a subsampled plate, a latent without a
    guide site, a model that cannot broadcast over chains; each named) at the cost of a few guide
    and model runs on two chains."""
    density = JointDensity(model, guide, args, kwargs, 2)
    density.log_densities(density.sample())
    if density.deltas:  # the reverse chains need the guide's variables at z*: check they are known
        density.unconstrain(simulate(model, args, kwargs)[0])


def bdmc(
    model: Model,
    guide: Guide,
    *args: Any,
    num_chains: int = 16,
    num_steps: int = 100,
    num_leapfrog: int = 5,
    transition: str = "hmc",
    step_size: float = 0.5,
    num_spread: int | None = None,
    simulate_args: Callable[[dict[str, Tensor]], tuple[Any, ...]] | None = None,
    **kwargs: Any,
) -> Sandwich:
    """Bidirectional Monte Carlo: sandwich :math:`\\log p(x^*)` on data simulated from the model.

    Draws :math:`(z^*, x^*) \\sim p(z, x)` (the model with its observations released), then runs
    forward AIS from the guide on :math:`x^*` (:math:`\\mathbb{E}\\log\\hat p \\le \\log p(x^*)`)
    and reverse AIS from the exact posterior draw :math:`z^*` (an unbiased estimate of
    :math:`1/p(x^*)`, so :math:`\\mathbb{E}[-\\log \\widehat{1/p}] \\ge \\log p(x^*)`). The true
    value lies in ``[lower, upper]`` up to Monte Carlo error, and so the guide's KL gap
    :math:`\\log p(x^*) - \\mathrm{ELBO}` lies in ``[lower - ELBO, upper - ELBO]``
    (``kl_gap(..., bdmc=True)`` reports it). The reverse run uses the forward run's tuned step sizes.

    The guide must see :math:`x^*`: every positional or keyword argument that *is* (the same
    tensor object as) an observed site's ``obs`` is replaced by the simulated value; otherwise
    pass ``simulate_args``, a function from ``{site: x*}`` to the model's new ``args``.

    Args:
        model, guide, *args, **kwargs: as for :func:`log_evidence` (one batch, not a loader).
        num_chains, num_steps, num_leapfrog, transition, step_size: as for AIS in
            :func:`log_evidence` (``num_chains`` is its ``num_particles``).
        num_spread: HMC transitions at the posterior (default ``max(10, num_steps // 5)``) that
            move each reverse chain away from :math:`z^*` before annealing: each start is still an
            exact posterior draw, but the chains no longer share one, so the spread of their
            weights includes the variability due to the start (with a shared start the standard
            error of ``upper`` is too small).
        simulate_args: maps the simulated observations to the model's positional arguments.

    Returns:
        A :class:`Sandwich` with ``lower``, ``upper``, ``width`` and the simulated data.

    Raises:
        ValueError: on an unknown transition, a discrete latent site or a subsampled plate (named).

    References:
        | Sandwiching the marginal likelihood using bidirectional Monte Carlo (Grosse et al., 2015)
        | https://arxiv.org/abs/1511.02543
        | On the Quantitative Analysis of Decoder-Based Generative Models (Wu et al., 2017)
        | https://arxiv.org/abs/1611.04273
    """
    sim = simulate_data(model, guide, args, kwargs, simulate_args)
    options: dict[str, Any] = dict(num_chains=num_chains, num_steps=num_steps, num_leapfrog=num_leapfrog)
    return sandwich(sim, guide, transition=transition, step_size=step_size, num_spread=num_spread, **options)


def sandwich(
    sim: Simulated,
    guide: Guide,
    *,
    num_chains: int = 16,
    num_steps: int = 100,
    num_leapfrog: int = 5,
    transition: str = "hmc",
    step_size: float = 0.5,
    num_spread: int | None = None,
) -> Sandwich:
    """Forward and reverse AIS on simulated data (see :func:`bdmc`)."""
    if transition not in TRANSITIONS:
        raise ValueError(f"unknown transition {transition!r}; choose from {tuple(TRANSITIONS)}")
    leapfrog = 1 if transition == "mala" else num_leapfrog
    options = dict(num_particles=num_chains, chunk_size=num_chains, num_steps=num_steps, num_leapfrog=leapfrog)
    forward, scale, steps = _ais(
        sim.model, guide, sim.args, sim.kwargs, **options, target_accept=TRANSITIONS[transition],
        step_size=step_size, num_pilot_chains=max(2, num_chains // 4),
    )  # fmt: skip
    target = JointDensity(sim.model, guide, sim.args, sim.kwargs, num_chains)
    spread = max(10, num_steps // 5) if num_spread is None else num_spread
    u0, _ = ais.mcmc(target, target.unconstrain(sim.latents), 1.0, steps[-1], scale, num_leapfrog=leapfrog,
                     num_transitions=spread)  # fmt: skip
    betas = ais.sigmoid_schedule(num_steps).flip(0)
    reverse_steps = torch.cat([steps.flip(0)[1:], steps[:1]])  # the step size of each target beta
    run = ais.anneal(target, u0, betas, reverse_steps, scale, num_leapfrog=leapfrog)
    reverse = _evidence(
        -ais.logmeanexp(run.log_w), ais.log_mean_se(run.log_w), "reverse-ais", num_chains,
        num_chains * (run.num_evals + spread * leapfrog), target.observed,
        acceptance_rate=run.acceptance.mean(0).reshape(-1), step_size=run.step_size.reshape(num_steps, -1),
        effective_chains=ais.effective_chains(run.log_w).reshape(-1),
    )  # fmt: skip
    return Sandwich(forward.total, reverse.total, forward, reverse, sim.latents, sim.observed)
