"""Models with closed-form log p(x) and KL(q || p(z | x)) for the kl_gap tests and sweeps.

Each family gives a model, the exact posterior, and guides from exact to far, each with its exact
KL (closed form, or Gauss-Hermite quadrature in the unconstrained space for ``AutoNormal``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoNormal
from torch.distributions import kl_divergence


@dataclass
class Case:
    """One model/guide pair: ``kl`` is the exact KL(q || p(z | x)), ``log_evidence`` log p(x)."""

    family: str
    guide_name: str
    model: Callable[..., Any]
    guide: Callable[..., Any]
    kl: float
    log_evidence: float


def _site(name: str, fn: Any) -> Callable[[], None]:
    return lambda: pyro.sample(name, fn)


def _autonormal(model: Callable[..., Any], name: str, loc: float, scale: float) -> AutoNormal:
    guide = AutoNormal(model)
    guide()
    with torch.no_grad():
        setattr(guide.locs, name, torch.tensor(loc))
        setattr(guide.scales, name, torch.tensor(scale))
    return guide


def _quadrature_kl(loc: float, scale: float, log_post_u: Callable[[np.ndarray], np.ndarray]) -> float:
    """KL(N(loc, scale) || p_u) by Gauss-Hermite quadrature (200 nodes)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(200)
    u = loc + scale * nodes
    log_q = -0.5 * nodes**2 - math.log(scale) - 0.5 * math.log(2 * math.pi)
    return float(np.sum(weights * (log_q - log_post_u(u))) / math.sqrt(2 * math.pi))


def normal_mean(guide: str) -> Case:
    """z ~ N(0, 1), x_i ~ N(z, 1), 5 points."""
    x = torch.tensor([0.5, 1.5, 1.0, -0.3, 0.8])
    post = dist.Normal(float(x.sum()) / 6, 6**-0.5)
    log_evidence = float(dist.MultivariateNormal(torch.zeros(5), torch.eye(5) + torch.ones(5, 5)).log_prob(x))

    def model() -> None:
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("obs", 5):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    m, s = float(post.loc), float(post.scale)
    q = {"exact": (m, s), "wide": (m + 0.3 * s, 1.5 * s), "narrow": (m, 0.5 * s), "shifted 20 sd": (m + 20 * s, s)}[
        guide
    ]
    fn = dist.Normal(*q)
    return Case("normal mean", guide, model, _site("z", fn), float(kl_divergence(fn, post)), log_evidence)


def linear_regression(guide: str) -> Case:
    """w ~ N(0, I_3), y ~ N(X w, 0.5^2), 20 points, correlated columns; guide mean-field over w."""
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(20, 3, generator=gen, dtype=torch.float64)
    X[:, 1] = X[:, 0] + 0.5 * X[:, 1]
    y = X @ torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64) + 0.5 * torch.randn(
        20, generator=gen, dtype=torch.float64
    )
    prec = torch.eye(3, dtype=torch.float64) + X.T @ X / 0.25
    cov = torch.linalg.inv(prec)
    mean = cov @ X.T @ y / 0.25
    post = dist.MultivariateNormal(mean, cov)
    log_evidence = float(
        dist.MultivariateNormal(torch.zeros(20, dtype=torch.float64), X @ X.T + 0.25 * torch.eye(20)).log_prob(y)
    )
    Xd, yd = X.to(torch.get_default_dtype()), y.to(torch.get_default_dtype())

    def model() -> None:
        w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(w @ Xd.T, 0.5).to_event(1), obs=yd)

    sd = cov.diagonal().sqrt()
    mean_field = prec.diagonal().rsqrt()  # the optimal mean-field scales
    loc, scale = {
        "exact": (mean, None),
        "mean-field": (mean, mean_field),
        "shifted 20 sd": (mean + 20 * sd, mean_field),
    }[guide]
    q64 = post if scale is None else dist.MultivariateNormal(loc, torch.diag(scale**2))
    fn = (
        dist.MultivariateNormal(loc.to(Xd.dtype), cov.to(Xd.dtype))
        if scale is None
        else dist.Normal(loc.to(Xd.dtype), scale.to(Xd.dtype)).to_event(1)
    )
    return Case("linear regression", guide, model, _site("w", fn), float(kl_divergence(q64, post)), log_evidence)


def beta_binomial(guide: str) -> Case:
    """p ~ Beta(1, 1), k ~ Binomial(200, p), k = 60."""
    n, k, a, b = 200, 60, 61.0, 141.0
    log_evidence = (
        math.lgamma(n + 1)
        - math.lgamma(k + 1)
        - math.lgamma(n - k + 1)
        + float(torch.lgamma(torch.tensor(a)) + torch.lgamma(torch.tensor(b)) - torch.lgamma(torch.tensor(a + b)))
    )

    def model() -> None:
        p = pyro.sample("p", dist.Beta(1.0, 1.0))
        pyro.sample("k", dist.Binomial(n, p), obs=torch.tensor(float(k)))

    post = torch.distributions.Beta(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    if guide == "AutoNormal":
        loc = float(torch.digamma(torch.tensor(a)) - torch.digamma(torch.tensor(b)))
        scale = float(torch.polygamma(1, torch.tensor(a)) + torch.polygamma(1, torch.tensor(b))) ** 0.5

        def log_post_u(u: np.ndarray) -> np.ndarray:
            p = 1 / (1 + np.exp(-u))
            return post.log_prob(torch.from_numpy(p)).numpy() + np.log(p * (1 - p))

        kl = _quadrature_kl(loc, scale, log_post_u)
        return Case("beta-binomial", guide, model, _autonormal(model, "p", loc, scale), kl, log_evidence)
    qa, qb = {"exact": (a, b), "off": (0.6 * a, b), "shifted 20 sd": (12 * a, b)}[guide]
    fn = dist.Beta(qa, qb)
    kl = float(
        kl_divergence(
            torch.distributions.Beta(torch.tensor(qa, dtype=torch.float64), torch.tensor(qb, dtype=torch.float64)), post
        )
    )
    return Case("beta-binomial", guide, model, _site("p", fn), kl, log_evidence)


def gamma_poisson(guide: str) -> Case:
    """lam ~ Gamma(2, 0.5), x_i ~ Poisson(lam), 30 counts."""
    gen = torch.Generator().manual_seed(5)
    x = torch.poisson(torch.full((30,), 7.0, dtype=torch.float64), generator=gen)
    a0, b0 = 2.0, 0.5
    a, b = a0 + float(x.sum()), b0 + 30
    log_evidence = (
        float(-torch.lgamma(x + 1).sum()) + a0 * math.log(b0) - math.lgamma(a0) + math.lgamma(a) - a * math.log(b)
    )
    xd = x.to(torch.get_default_dtype())

    def model() -> None:
        lam = pyro.sample("lam", dist.Gamma(a0, b0))
        with pyro.plate("obs", 30):
            pyro.sample("x", dist.Poisson(lam), obs=xd)

    post = torch.distributions.Gamma(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    if guide == "AutoNormal":
        loc, scale = math.log(a / b) - 0.5 / a, a**-0.5  # lognormal matching the log-moments

        def log_post_u(u: np.ndarray) -> np.ndarray:
            return post.log_prob(torch.from_numpy(np.exp(u))).numpy() + u

        kl = _quadrature_kl(loc, scale, log_post_u)
        return Case("gamma-poisson", guide, model, _autonormal(model, "lam", loc, scale), kl, log_evidence)
    qa, qb = {"exact": (a, b), "off": (a, 0.8 * b), "shifted 20 sd": (a, b / (1 + 20 * a**-0.5))}[guide]
    fn = dist.Gamma(qa, qb)
    kl = float(
        kl_divergence(
            torch.distributions.Gamma(torch.tensor(qa, dtype=torch.float64), torch.tensor(qb, dtype=torch.float64)),
            post,
        )
    )
    return Case("gamma-poisson", guide, model, _site("lam", fn), kl, log_evidence)


def dirichlet_multinomial(guide: str) -> Case:
    """pi ~ Dirichlet(1, 1, 1), counts ~ Multinomial(pi), counts (30, 50, 20)."""
    counts = torch.tensor([30.0, 50.0, 20.0], dtype=torch.float64)
    alpha0 = torch.ones(3, dtype=torch.float64)
    alpha = alpha0 + counts
    lbeta = lambda v: float(torch.lgamma(v).sum() - torch.lgamma(v.sum()))  # noqa: E731
    log_evidence = float(torch.lgamma(counts.sum() + 1) - torch.lgamma(counts + 1).sum()) + lbeta(alpha) - lbeta(alpha0)
    cd = counts.to(torch.get_default_dtype())

    def model() -> None:
        pi = pyro.sample("pi", dist.Dirichlet(torch.ones(3)))
        pyro.sample("c", dist.Multinomial(100, pi), obs=cd)

    q = {
        "exact": alpha,
        "off": alpha * torch.tensor([1.3, 0.8, 1.0], dtype=torch.float64),
        "shifted 20 sd": alpha * torch.tensor([8.0, 0.2, 1.0], dtype=torch.float64),
    }[guide]
    kl = float(kl_divergence(torch.distributions.Dirichlet(q), torch.distributions.Dirichlet(alpha)))
    return Case("dirichlet-multinomial", guide, model, _site("pi", dist.Dirichlet(q.to(cd.dtype))), kl, log_evidence)


def local_normal(guide: str) -> Case:
    """Per-point z_i ~ N(0, 1), x_i ~ N(z_i, 0.5^2), 6 points: bounds per data point."""
    x = torch.linspace(-2, 2, 6)
    post_var = 1 / (1 + 4.0)
    post_loc = post_var * 4 * x
    log_evidence = float(dist.Normal(0.0, 1.25**0.5).log_prob(x).sum())

    def model() -> None:
        with pyro.plate("data", 6):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    shift, ratio = {"exact": (0.0, 1.0), "off": (0.4, 1.2), "shifted 20 sd": (20 * post_var**0.5, 1.0)}[guide]
    loc, scale = post_loc + shift, ratio * post_var**0.5

    def g() -> None:
        with pyro.plate("data", 6):
            pyro.sample("z", dist.Normal(loc, scale))

    kl = 6 * (math.log(1 / ratio) + (ratio**2 + shift**2 / post_var) / 2 - 0.5)
    return Case("local normal (per point)", guide, model, g, kl, log_evidence)


FAMILIES: dict[str, tuple[Callable[[str], Case], tuple[str, ...]]] = {
    "normal mean": (normal_mean, ("exact", "wide", "narrow", "shifted 20 sd")),
    "linear regression": (linear_regression, ("exact", "mean-field", "shifted 20 sd")),
    "beta-binomial": (beta_binomial, ("exact", "AutoNormal", "off", "shifted 20 sd")),
    "gamma-poisson": (gamma_poisson, ("exact", "AutoNormal", "off", "shifted 20 sd")),
    "dirichlet-multinomial": (dirichlet_multinomial, ("exact", "off", "shifted 20 sd")),
    "local normal": (local_normal, ("exact", "off", "shifted 20 sd")),
}
