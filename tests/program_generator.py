"""Random Pyro programs with exactly known answers, written out as Pyro code.

``generate(seed)`` draws a program from a small grammar: a conjugate family (Normal-Normal,
linear-Gaussian with several latents, Beta-Bernoulli, Gamma-Poisson, Dirichlet-Categorical),
its latent outside the data plate (one global latent, N observations) or inside it (one latent
per group, a nested ``trials`` plate of observations), the data plate sized, size-less or
subsampled, a guide (the exact posterior; shifted by 0.1-20 posterior sd; too narrow or too
wide; ``AutoNormal``; ``AutoMultivariateNormal``; amortized by a small network, with or without
``nn.Dropout`` in training mode), float32 or float64, and extras (``pyro.deterministic``,
``pyro.factor``, an observation mask, ``LocScaleReparam``).

The program is *source code*: ``Program.source`` is executed to build ``model``, ``guide`` and
``data``, so the text printed with a failure is exactly the program that failed. The answers
are computed separately, in float64, from the grammar's choices: the exact ``log p(x)`` (the
factor and the mask included), the exact posterior, and the exact ``KL(q || p(z | x))`` where the
guide's family matches the posterior's (else a Monte Carlo estimate with its standard error).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

FAMILIES = ("normal", "linreg", "beta_bernoulli", "gamma_poisson", "dirichlet_categorical", "hierarchical")
GUIDES = ("exact", "shifted", "narrow", "wide", "autonormal", "automvn", "amortized", "dropout")
PLATES = ("sized", "sizeless", "subsampled")


@dataclass
class Program:
    """One generated program and its exact answers."""

    seed: int
    family: str
    layout: str  # "global": one latent outside the data plate; "local": one latent per group
    plate: str
    guide_kind: str
    dtype: str
    extras: tuple[str, ...]
    source: str
    log_evidence: float
    points: int  # data points a per-point result must have (1 when the bound is joint)
    shift: float = 0.0
    kl: float | None = None  # exact when closed form, else estimated by ``estimate_kl``
    kl_se: float = 0.0
    namespace: dict[str, Any] = field(default_factory=dict)

    @property
    def cell(self) -> str:
        return f"{self.family}/{self.guide_kind}/{self.dtype}"

    @property
    def model(self) -> Any:
        return self.namespace["model"]

    @property
    def guide(self) -> Any:
        return self.namespace["guide"]

    @property
    def data(self) -> Tensor:
        return self.namespace["data"]

    def __str__(self) -> str:
        kl = "unknown" if self.kl is None else f"{self.kl:.6g} ± {self.kl_se:.2g}"
        return (
            f"# generated program, seed {self.seed}: {self.cell}, {self.layout} latent, {self.plate} plate, "
            f"extras {list(self.extras)}\n# exact log p(x) = {self.log_evidence:.6f}, KL(q || p) = {kl}, "
            f"points {self.points}\n{self.source}"
        )


def _lit(t: Tensor) -> str:
    """A tensor as Python source (full float64 precision)."""
    if t.dtype in (torch.int64, torch.bool):
        return f"torch.tensor({t.tolist()})"
    return f"torch.tensor({[float(v) for v in t.flatten().tolist()]}).reshape({tuple(t.shape)})"


def _posterior(family: str, prior: dict[str, Tensor], x: Tensor, keep: Tensor) -> tuple[Any, Tensor]:
    """The exact posterior and ``log p(x)`` of one conjugate block (observations ``x`` along
    dim 0 (and dim 0 of ``keep``, the unmasked ones), float64)."""
    x, keep = x.double(), keep
    if family == "normal":
        m0, s0, sigma = prior["m0"], prior["s0"], prior["sigma"]
        xs = x[keep]
        n = xs.shape[0]
        precision = 1 / s0**2 + n / sigma**2
        post = dist.Normal((m0 / s0**2 + xs.sum() / sigma**2) / precision, precision**-0.5)
        cov = sigma**2 * torch.eye(n, dtype=torch.float64) + s0**2
        log_p = dist.MultivariateNormal(m0.expand(n), cov).log_prob(xs) if n else torch.tensor(0.0)
        return post, log_p
    if family == "linreg":
        design, s0, sigma = prior["X"][keep], prior["s0"], prior["sigma"]
        xs = x[keep]
        d = design.shape[1]
        precision = torch.eye(d, dtype=torch.float64) / s0**2 + design.T @ design / sigma**2
        cov = torch.linalg.inv(precision)
        post = dist.MultivariateNormal(cov @ design.T @ xs / sigma**2, covariance_matrix=cov)
        marginal = s0**2 * design @ design.T + sigma**2 * torch.eye(len(xs), dtype=torch.float64)
        return post, dist.MultivariateNormal(torch.zeros(len(xs), dtype=torch.float64), marginal).log_prob(xs)
    if family == "beta_bernoulli":
        a, b = prior["a"], prior["b"]
        xs = x[keep]
        k, n = xs.sum(), xs.shape[0]
        post = dist.Beta(a + k, b + n - k)
        log_p = _lbeta(a + k, b + n - k) - _lbeta(a, b)
        return post, log_p
    if family == "gamma_poisson":
        a, b = prior["a"], prior["b"]
        xs = x[keep]
        s, n = xs.sum(), xs.shape[0]
        post = dist.Gamma(a + s, b + n)
        log_p = a * b.log() - torch.lgamma(a) + torch.lgamma(a + s) - (a + s) * (b + n).log()
        return post, log_p - torch.lgamma(xs + 1).sum()
    alpha = prior["alpha"]
    counts = torch.bincount(x[keep].long(), minlength=len(alpha)).double()
    post = dist.Dirichlet(alpha + counts)
    log_p = torch.lgamma(alpha.sum()) - torch.lgamma(alpha.sum() + counts.sum())
    return post, log_p + (torch.lgamma(alpha + counts) - torch.lgamma(alpha)).sum()


def _lbeta(a: Tensor, b: Tensor) -> Tensor:
    return torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)


def _moved(post: Any, kind: str, shift: float) -> Any:
    """A guide of the posterior's family: shifted by ``shift`` posterior sd, or narrower/wider."""
    factor = {"narrow": 0.3, "wide": 3.0}.get(kind, 1.0)
    if isinstance(post, dist.MultivariateNormal):
        sd = post.covariance_matrix.diagonal().sqrt()
        return dist.MultivariateNormal(post.loc + shift * sd, scale_tril=factor * post.scale_tril)
    if isinstance(post, dist.Normal):
        return dist.Normal(post.loc + shift * post.scale, factor * post.scale)
    if isinstance(post, dist.Beta):
        mean, total = post.mean, post.concentration1 + post.concentration0
        sd = post.variance.sqrt()
        moved = mean + shift * sd
        moved = torch.where(moved < 0.98, moved, mean - shift * sd).clamp(0.02, 0.98)
        total = total / factor**2
        return dist.Beta(moved * total, (1 - moved) * total)
    if isinstance(post, dist.Gamma):
        mean, var = post.mean + shift * post.variance.sqrt(), post.variance * factor**2
        return dist.Gamma(mean**2 / var, mean / var)
    alpha = post.concentration.clone()
    alpha[..., 0] = alpha[..., 0] * (1 + shift)
    return dist.Dirichlet(alpha / factor**2)


def _q_source(q: Any, index: str) -> str:
    """Source of a guide distribution with literal parameters (``index``: ``[idx]`` when subsampled)."""

    def p(t: Tensor) -> str:
        return _lit(t) + index

    if isinstance(q, dist.MultivariateNormal):
        return f"dist.MultivariateNormal({p(q.loc)}, scale_tril={_lit(q.scale_tril)})"
    if isinstance(q, dist.Normal):
        return f"dist.Normal({p(q.loc)}, {p(q.scale)})"
    if isinstance(q, dist.Beta):
        return f"dist.Beta({p(q.concentration1)}, {p(q.concentration0)})"
    if isinstance(q, dist.Gamma):
        return f"dist.Gamma({p(q.concentration)}, {p(q.rate)})"
    return f"dist.Dirichlet({p(q.concentration)})"


def generate(seed: int, **force: Any) -> Program:
    """Draw one program (``force``: fix any of ``family``, ``layout``, ``plate``, ``guide_kind``,
    ``dtype``, ``extras``, ``shift``). The same seed gives the same program, whatever the global
    random state (which is left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _generate(seed, **force)


def _generate(seed: int, **force: Any) -> Program:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    family = force.get("family", rng.choice(FAMILIES))
    layout = force.get("layout", "global" if family == "linreg" else rng.choice(("global", "local")))
    if family == "hierarchical":  # a global mean outside the data plate, a latent per group inside it
        layout = "local"
    plate = force.get("plate", rng.choices(PLATES, weights=(6, 3, 1))[0])
    kinds = [g for g in GUIDES if layout == "local" or g not in ("amortized", "dropout")]
    if plate == "sizeless":  # Pyro's autoguides cannot build a plate without a size
        kinds = [g for g in kinds if not g.startswith("auto")]
    if family != "normal":
        kinds = [g for g in kinds if g not in ("amortized", "dropout")]
    guide_kind = force.get("guide_kind", rng.choice(kinds))
    dtype = force.get("dtype", rng.choice(("float32", "float64")))
    shift = force.get("shift", rng.choice((0.1, 1.0, 3.0, 20.0)) if guide_kind == "shifted" else 0.0)
    extras = list(force.get("extras", [e for e in ("deterministic", "factor", "mask") if rng.random() < 0.25]))
    if "extras" not in force and family == "normal" and guide_kind.startswith("auto") and rng.random() < 0.5:
        extras.append("reparam")
    extras_t = tuple(extras)
    if family == "hierarchical":
        return _hierarchical(seed, rng, gen, plate, guide_kind, dtype, extras_t, shift)

    groups = rng.randint(3, 6) if layout == "local" else 1
    trials = rng.randint(2, 4) if layout == "local" else rng.randint(3, 8)
    d = 3
    prior: dict[str, Tensor] = {}
    f64 = torch.float64
    if family in ("normal", "linreg"):
        prior = {"m0": torch.tensor(rng.uniform(-2, 2), dtype=f64), "s0": torch.tensor(rng.uniform(0.5, 3), dtype=f64)}
        prior["sigma"] = torch.tensor(rng.uniform(0.3, 2), dtype=f64)
        if family == "linreg":
            prior["X"] = torch.randn(trials, d, generator=gen, dtype=f64)
    elif family in ("beta_bernoulli", "gamma_poisson"):
        prior = {"a": torch.tensor(rng.uniform(0.5, 4), dtype=f64), "b": torch.tensor(rng.uniform(0.5, 4), dtype=f64)}
    else:
        prior = {"alpha": torch.rand(3, generator=gen, dtype=f64) * 3 + 0.3}

    # data from the prior predictive, per group: [trials, groups]
    columns = []
    for _ in range(groups):
        if family == "normal":
            z = prior["m0"] + prior["s0"] * torch.randn((), generator=gen, dtype=f64)
            columns.append(z + prior["sigma"] * torch.randn(trials, generator=gen, dtype=f64))
        elif family == "linreg":
            w = prior["s0"] * torch.randn(d, generator=gen, dtype=f64)
            columns.append(prior["X"] @ w + prior["sigma"] * torch.randn(trials, generator=gen, dtype=f64))
        elif family == "beta_bernoulli":
            p = torch.distributions.Beta(prior["a"], prior["b"]).sample()
            columns.append((torch.rand(trials, generator=gen, dtype=f64) < p).double())
        elif family == "gamma_poisson":
            lam = torch.distributions.Gamma(prior["a"], prior["b"]).sample()
            columns.append(torch.poisson(lam.expand(trials), generator=gen))
        else:
            theta = torch.distributions.Dirichlet(prior["alpha"]).sample()
            columns.append(torch.multinomial(theta.float(), trials, replacement=True, generator=gen).double())
    x = torch.stack(columns, -1)  # [trials, groups]
    keep = torch.ones_like(x, dtype=torch.bool)
    if "mask" in extras_t:
        keep[-1, 0] = False
    factor_c = round(rng.uniform(-2, 2), 3)

    posts, log_ps = zip(*[_posterior(family, prior, x[:, g], keep[:, g]) for g in range(groups)])
    log_evidence = float(sum(log_ps))
    if "factor" in extras_t:
        log_evidence += factor_c * groups
    posterior = _stack(posts)

    source = _source(family, layout, plate, guide_kind, dtype, extras_t, prior, x, keep, factor_c, posterior, shift,
                     groups, trials, seed)  # fmt: skip
    subsampled = plate == "subsampled"
    points = groups if layout == "local" and not subsampled and guide_kind != "automvn" else 1
    program = Program(seed, family, layout, plate, guide_kind, dtype, extras_t, source, log_evidence, points, shift)
    program.namespace = build(source)
    if guide_kind in ("exact", "shifted", "narrow", "wide") and not subsampled:
        program.kl = float(_kl(_moved(posterior, guide_kind, shift), posterior, groups))
    elif guide_kind == "amortized" and not subsampled:
        with torch.no_grad():
            q = program.namespace["guide_dist"](program.data)
        program.kl = float(_kl(_as64(q), posterior, groups))
    program.namespace["posterior"] = posterior
    return program


def _stack(posts: tuple[Any, ...]) -> Any:
    if len(posts) == 1:
        return posts[0]
    p = posts[0]
    if isinstance(p, dist.Normal):
        return dist.Normal(torch.stack([q.loc for q in posts]), torch.stack([q.scale for q in posts]))
    if isinstance(p, dist.Beta):
        return dist.Beta(torch.stack([q.concentration1 for q in posts]), torch.stack([q.concentration0 for q in posts]))
    if isinstance(p, dist.Gamma):
        return dist.Gamma(torch.stack([q.concentration for q in posts]), torch.stack([q.rate for q in posts]))
    return dist.Dirichlet(torch.stack([q.concentration for q in posts]))


def _as64(q: Any) -> Any:
    return dist.Normal(q.loc.double(), q.scale.double())


def _kl(q: Any, posterior: Any, groups: int) -> Tensor:
    q = _as64(q) if isinstance(q, dist.Normal) else q
    kl = torch.distributions.kl_divergence(q, posterior)
    return kl.sum()


def _source(family: str, layout: str, plate: str, guide_kind: str, dtype: str, extras: tuple[str, ...],
            prior: dict[str, Tensor], x: Tensor, keep: Tensor, factor_c: float, posterior: Any, shift: float,
            groups: int, trials: int, seed: int) -> str:  # fmt: skip
    """The program as Pyro source."""
    lines = [
        "import torch, pyro, pyro.distributions as dist",
        "from torch import nn",
        "from pyro import poutine",
        "from pyro.infer.autoguide import AutoNormal, AutoMultivariateNormal",
        "from pyro.infer.reparam import LocScaleReparam",
        f"torch.set_default_dtype(torch.{dtype})",
    ]
    local = layout == "local"
    size = groups if local else trials
    sub = plate == "subsampled"
    plate_args = {
        "sized": f'"data", {size}',
        "sizeless": '"data"',
        "subsampled": f'"data", {size}, subsample_size={max(1, size // 2)}',
    }[plate]  # noqa: E501
    as_idx = " as idx" if sub else ""
    if family == "dirichlet_categorical":
        data_src = f"data = {_lit(x.long())}" + ("" if local else "[:, 0]")
    else:
        data_src = f"data = {_lit(x)}" + ("" if local else "[:, 0]")
    lines.append(data_src)
    lines.append(f"mask = {_lit(keep)}" + ("" if local else "[:, 0]"))
    if family == "linreg":
        lines.append(f"X = {_lit(prior['X'])}")
    n_local = "len(idx)" if sub else "data.shape[-1]"

    def prior_src() -> str:
        if family in ("normal", "linreg"):
            m0, s0 = float(prior["m0"]), float(prior["s0"])
            if family == "linreg":
                return f"dist.Normal(torch.zeros(3), {s0!r}).to_event(1)"
            return f"dist.Normal(torch.full(({n_local},), {m0!r}), {s0!r})" if local else f"dist.Normal({m0!r}, {s0!r})"
        if family == "beta_bernoulli":
            a, b = float(prior["a"]), float(prior["b"])
            return f"dist.Beta(torch.full(({n_local},), {a!r}), {b!r})" if local else f"dist.Beta({a!r}, {b!r})"
        if family == "gamma_poisson":
            a, b = float(prior["a"]), float(prior["b"])
            return f"dist.Gamma(torch.full(({n_local},), {a!r}), {b!r})" if local else f"dist.Gamma({a!r}, {b!r})"
        alpha = _lit(prior["alpha"])
        return f"dist.Dirichlet({alpha}.expand({n_local}, 3))" if local else f"dist.Dirichlet({alpha})"

    def lik_src(z: str) -> str:
        if family == "normal":
            return f"dist.Normal({z}, {float(prior['sigma'])!r})"
        if family == "linreg":
            design = "X[idx]" if sub else "X"
            return f"dist.Normal({design} @ {z}, {float(prior['sigma'])!r})"
        if family == "beta_bernoulli":
            return f"dist.Bernoulli({z})"
        if family == "gamma_poisson":
            return f"dist.Poisson({z})"
        return f"dist.Categorical({z})"

    obs = ("data[:, idx]" if local else "data[idx]") if sub else "data"
    msk = ("mask[:, idx]" if local else "mask[idx]") if sub else "mask"
    lines.append("")
    lines.append("def model(data):")
    if local:
        lines.append(f"    with pyro.plate({plate_args}){as_idx}:")
        lines.append(f'        z = pyro.sample("z", {prior_src()})')
        if "deterministic" in extras:
            lines.append('        pyro.deterministic("z_twice", 2 * z)')
        if "factor" in extras:
            lines.append(f'        pyro.factor("f", torch.full(({n_local},), {factor_c!r}))')
        lines.append(f'        with pyro.plate("trials", {trials}, dim=-2), poutine.mask(mask={msk}):')
        lines.append(f'            pyro.sample("x", {lik_src("z")}, obs={obs})')
    else:
        lines.append(f'    z = pyro.sample("z", {prior_src()})')
        if "deterministic" in extras:
            lines.append('    pyro.deterministic("z_twice", 2 * z)')
        if "factor" in extras:
            lines.append(f'    pyro.factor("f", torch.tensor({factor_c!r}))')
        lines.append(f"    with pyro.plate({plate_args}){as_idx}, poutine.mask(mask={msk}):")
        lines.append(f'        pyro.sample("x", {lik_src("z")}, obs={obs})')
    if "reparam" in extras:
        lines.append("")
        lines.append('model = poutine.reparam(model, config={"z": LocScaleReparam(0.0)})')
    lines.append("")
    if guide_kind in ("autonormal", "automvn"):
        cls = "AutoNormal" if guide_kind == "autonormal" else "AutoMultivariateNormal"
        lines.append(f"guide = {cls}(model)")
    elif guide_kind in ("amortized", "dropout"):
        lines.append(f"torch.manual_seed({seed})")
        drop = "nn.Dropout(0.3), " if guide_kind == "dropout" else ""
        lines.append(f"net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), {drop}nn.Linear(8, 2))")
        lines.append("")
        lines.append("def guide_dist(data):")
        lines.append("    out = net(data.mean(0).unsqueeze(-1))")
        lines.append("    return dist.Normal(out[..., 0], nn.functional.softplus(out[..., 1]) + 0.05)")
        lines.append("")
        lines.append("def guide(data):")
        lines.append('    pyro.module("net", net)')
        lines.append(f"    with pyro.plate({plate_args}){as_idx}:")
        lines.append(f'        pyro.sample("z", guide_dist({"data[:, idx]" if sub else "data"}))')
    else:
        q = _moved(posterior, guide_kind, shift)
        index = "[idx]" if sub and local else ""
        lines.append("def guide_dist(data, idx=None):")
        lines.append(f"    return {_q_source(q, index if sub else '')}")
        lines.append("")
        lines.append("def guide(data):")
        if local:
            lines.append(f"    with pyro.plate({plate_args}){as_idx}:")
            lines.append(f'        pyro.sample("z", guide_dist(data{", idx" if sub else ""}))')
        else:
            lines.append('    pyro.sample("z", guide_dist(data))')
    return "\n".join(lines) + "\n"


def _hierarchical(seed: int, rng: random.Random, gen: torch.Generator, plate: str, guide_kind: str, dtype: str,
                  extras: tuple[str, ...], shift: float) -> Program:  # fmt: skip
    """m ~ N(m0, s0); z_g ~ N(m, tau) in the data plate; x_gj ~ N(z_g, sigma) in a nested plate.

    The latents u = (m, z_1..z_G) and the data are jointly Gaussian: the posterior is
    N(mu, Sigma) with Sigma = (Sigma0^-1 + H^T H / sigma^2)^-1, and the exact guide is
    q(m) q(z | m) with z_g | m ~ N(alpha_g + beta_g m, gamma_g), read off the posterior precision."""
    f64 = torch.float64
    groups, trials = rng.randint(3, 6), rng.randint(2, 4)
    m0, s0 = rng.uniform(-2, 2), rng.uniform(0.5, 3)
    tau, sigma = rng.uniform(0.3, 2), rng.uniform(0.3, 2)
    m = m0 + s0 * torch.randn((), generator=gen, dtype=f64)
    z = m + tau * torch.randn(groups, generator=gen, dtype=f64)
    x = z + sigma * torch.randn(trials, groups, generator=gen, dtype=f64)
    keep = torch.ones_like(x, dtype=torch.bool)
    if "mask" in extras:
        keep[-1, 0] = False
    factor_c = round(rng.uniform(-2, 2), 3)
    # prior of u = (m, z): mean m0, cov s0^2 everywhere plus tau^2 on the z diagonal
    mean0 = torch.full((groups + 1,), m0, dtype=f64)
    cov0 = torch.full((groups + 1, groups + 1), s0**2, dtype=f64) + torch.diag(torch.tensor([0.0] + [tau**2] * groups))
    rows = [(j, g) for g in range(groups) for j in range(trials) if keep[j, g]]
    design = torch.zeros(len(rows), groups + 1, dtype=f64)
    for r, (_, g) in enumerate(rows):
        design[r, g + 1] = 1.0
    y = torch.stack([x[j, g] for j, g in rows])
    precision = torch.linalg.inv(cov0) + design.T @ design / sigma**2
    cov = torch.linalg.inv(precision)
    mu = cov @ (torch.linalg.solve(cov0, mean0) + design.T @ y / sigma**2)
    posterior = dist.MultivariateNormal(mu, covariance_matrix=cov)
    marginal = design @ cov0 @ design.T + sigma**2 * torch.eye(len(rows), dtype=f64)
    log_evidence = float(dist.MultivariateNormal(design @ mean0, marginal).log_prob(y))
    if "factor" in extras:
        log_evidence += factor_c * groups
    # the exact guide's parameters, then moved as the guide kind says
    lam_zz, lam_zm = precision.diagonal()[1:], precision[1:, 0]
    beta = -lam_zm / lam_zz
    gamma = lam_zz.rsqrt()
    alpha = mu[1:] - beta * mu[0]
    mu_m, sd_m = mu[0], cov[0, 0].sqrt()
    factor = {"narrow": 0.3, "wide": 3.0}.get(guide_kind, 1.0)
    mu_m, alpha = mu_m + shift * sd_m, alpha + shift * gamma
    sd_m, gamma = factor * sd_m, factor * gamma

    sub = plate == "subsampled"
    plate_args = {
        "sized": f'"data", {groups}',
        "sizeless": '"data"',
        "subsampled": f'"data", {groups}, subsample_size={max(1, groups // 2)}',
    }[plate]  # noqa: E501
    as_idx = " as idx" if sub else ""
    n_local = "len(idx)" if sub else "data.shape[-1]"
    obs, msk, ix = ("data[:, idx]", "mask[:, idx]", "[idx]") if sub else ("data", "mask", "")
    lines = [
        "import torch, pyro, pyro.distributions as dist",
        "from pyro import poutine",
        "from pyro.infer.autoguide import AutoNormal, AutoMultivariateNormal",
        "from pyro.infer.reparam import LocScaleReparam",
        f"torch.set_default_dtype(torch.{dtype})",
        f"data = {_lit(x)}",
        f"mask = {_lit(keep)}",
        "",
        "def model(data):",
        f'    m = pyro.sample("m", dist.Normal({m0!r}, {s0!r}))',
        f"    with pyro.plate({plate_args}){as_idx}:",
        f'        z = pyro.sample("z", dist.Normal(m + torch.zeros({n_local}), {tau!r}))',
    ]
    if "deterministic" in extras:
        lines.append('        pyro.deterministic("z_twice", 2 * z)')
    if "factor" in extras:
        lines.append(f'        pyro.factor("f", torch.full(({n_local},), {factor_c!r}))')
    lines.append(f'        with pyro.plate("trials", {trials}, dim=-2), poutine.mask(mask={msk}):')
    lines.append(f'            pyro.sample("x", dist.Normal(z, {sigma!r}), obs={obs})')
    if "reparam" in extras:
        lines += ["", 'model = poutine.reparam(model, config={"z": LocScaleReparam(0.0)})']
    lines.append("")
    if guide_kind in ("autonormal", "automvn"):
        lines.append(f"guide = {'AutoNormal' if guide_kind == 'autonormal' else 'AutoMultivariateNormal'}(model)")
    else:
        lines += [
            "def guide(data):",
            f'    m = pyro.sample("m", dist.Normal({float(mu_m)!r}, {float(sd_m)!r}))',
            f"    with pyro.plate({plate_args}){as_idx}:",
            f"        alpha, beta, gamma = {_lit(alpha)}{ix}, {_lit(beta)}{ix}, {_lit(gamma)}{ix}",
            '        pyro.sample("z", dist.Normal(alpha + beta * m, gamma))',
        ]
    source = "\n".join(lines) + "\n"
    program = Program(seed, "hierarchical", "global+local", plate, guide_kind, dtype, extras, source, log_evidence, 1,
                      shift)  # fmt: skip
    program.namespace = build(source)
    if guide_kind in ("exact", "shifted", "narrow", "wide") and not sub:
        q_mean = torch.cat([mu_m.reshape(1), alpha + beta * mu_m])
        link = torch.cat([torch.ones(1, dtype=f64), beta])
        q_cov = sd_m**2 * torch.outer(link, link) + torch.diag(torch.cat([torch.zeros(1, dtype=f64), gamma**2]))
        q = dist.MultivariateNormal(q_mean, covariance_matrix=q_cov)
        program.kl = float(torch.distributions.kl_divergence(q, posterior))
    program.namespace["posterior"] = posterior
    return program


def build(source: str) -> dict[str, Any]:
    """Execute a program's source (in a fresh namespace; the default dtype is the program's)."""
    namespace: dict[str, Any] = {}
    exec(compile(source, "<generated program>", "exec"), namespace)  # noqa: S102 - our own generated code
    return namespace


def estimate_kl(program: Program, num_particles: int = 20_000) -> None:
    """``KL = log p(x) - E_q[log w]`` by Monte Carlo in float64 for guides without a closed form."""
    from pyro_elbo.weights import log_weights

    previous = torch.get_default_dtype()
    with torch.no_grad():
        lw = log_weights(program.model, program.guide, program.data, num_particles=num_particles).log_w
    torch.set_default_dtype(previous)
    total = lw.double().reshape(num_particles, -1).sum(1)
    program.kl = program.log_evidence - float(total.mean())
    program.kl_se = float(total.std()) / math.sqrt(num_particles)


__all__ = ["FAMILIES", "GUIDES", "PLATES", "Program", "build", "estimate_kl", "generate", "pyro", "nn"]
