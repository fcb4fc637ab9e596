"""A diffusion model on scikit-learn's 8x8 digits, written as a Pyro program and scored per image
==============================================================================================

A diffusion model is a hierarchical VAE with ``T`` latent images ``x_1..x_T``:

* the **guide** is the fixed forward noising process :math:`q(x_{1:T} \\mid x_0)` with
  :math:`q(x_t \\mid x_0) = N(\\sqrt{\\bar\\alpha_t}\\, x_0, (1 - \\bar\\alpha_t) I)`, written in its
  reverse factorization :math:`q(x_T \\mid x_0) \\prod_{t \\ge 2} q(x_{t-1} \\mid x_t, x_0)` (the same
  joint, with Gaussian conditionals in closed form), so each model site has a guide site of the
  same family and its KL term is analytic. The schedule is linear in the log signal-to-noise
  ratio :math:`\\log \\mathrm{SNR}_t = \\log(\\bar\\alpha_t / (1-\\bar\\alpha_t))`, from
  ``--logsnr-max`` at ``t = 1`` to ``--logsnr-min`` at ``t = T`` (``--schedule cosine``: a
  truncated cosine, which spends too few steps where the grey levels are resolved);
* the **model** is the learned reverse process :math:`p(x_T) \\prod_t p_\\theta(x_{t-1} \\mid x_t)`
  with one shared residual MLP. It predicts :math:`\\hat x_0` as the mean of a per-pixel
  posterior over the 17 grey levels (its belief times the forward process's likelihood, so that
  :math:`\\hat x_0` snaps to a level at high SNR; see :func:`predict_x0`) and a per-pixel
  variance :math:`\\log \\sigma_t^2 = v \\log \\beta_t + (1 - v) \\log \\tilde\\beta_t` (learned
  variances, Nichol & Dhariwal 2021), and a discretized Gaussian decoder
  :math:`p_\\theta(x_0 \\mid x_1)` over the 17 grey levels, so that :math:`-\\log p(x_0)` is a code
  length in bits per pixel.

Its negative ELBO is the sum of the DDPM loss terms, :math:`L_T + \\sum_{t \\ge 2} L_{t-1} + L_0`
(prior KL, reverse-step KLs, decoder), all in closed form but ``L_0``. It is trained with
:func:`pyro_elbo.fit` and ``ELBO(analytic_kl=True)``; the test set is scored with
:func:`pyro_elbo.log_evidence` (IWAE and AIS) in bits per dimension, next to an
independent-pixel categorical baseline; samples go to a PNG::

    python examples/diffusion_digits.py --png docs/diffusion_digits_samples.png

References:
    | Denoising Diffusion Probabilistic Models (Ho et al., 2020)
    | https://arxiv.org/abs/2006.11239
    | Improved Denoising Diffusion Probabilistic Models (Nichol & Dhariwal, 2021)
    | https://arxiv.org/abs/2102.09672
    | Continuous diffusion for categorical data (Dieleman et al., 2022)
    | https://arxiv.org/abs/2211.15089
    | Variational Diffusion Models (Kingma et al., 2021)
    | https://arxiv.org/abs/2107.00630
    | Deep Unsupervised Learning using Nonequilibrium Thermodynamics (Sohl-Dickstein et al., 2015)
    | https://arxiv.org/abs/1503.03585
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from torch import Tensor, nn

LEVELS = 17  # grey levels 0..16 of the digits
HALF_BIN = 1.0 / (LEVELS - 1)  # pixels live on [-1, 1], bins of width 2 / 16
PIXELS = 64


class Schedule:
    """Forward-process constants for ``T`` steps, :math:`\\log\\mathrm{SNR}_t` from ``logsnr_max`` at
    ``t = 1`` to ``logsnr_min`` at ``t = T``: ``"linear"`` in ``t``, or ``"cosine"``,
    :math:`-2 \\log\\tan(a + (b - a) \\frac{t-1}{T-1})` (Nichol & Dhariwal, 2021, truncated as in
    Kingma et al., 2021); :math:`\\bar\\alpha_t = \\sigma(\\log\\mathrm{SNR}_t)`."""

    def __init__(self, T: int, logsnr_max: float = 8.0, logsnr_min: float = -6.0, kind: str = "linear") -> None:
        self.T = T
        u = torch.linspace(0.0, 1.0, T, dtype=torch.float64) if T > 1 else torch.zeros(1, dtype=torch.float64)
        if kind == "cosine":
            a, b = math.atan(math.exp(-logsnr_max / 2)), math.atan(math.exp(-logsnr_min / 2))
            logsnr = -2 * torch.tan(a + (b - a) * u).log()
        else:
            logsnr = logsnr_max + (logsnr_min - logsnr_max) * u
        self.logsnr = logsnr.to(torch.get_default_dtype())
        self.alpha_bar = torch.sigmoid(self.logsnr)
        prev = torch.cat([torch.ones(1), self.alpha_bar[:-1]])
        self.alpha_bar_prev = prev
        self.beta = 1 - self.alpha_bar / prev
        self.alpha = 1 - self.beta
        self.beta_tilde = (1 - prev) / (1 - self.alpha_bar) * self.beta  # q(x_{t-1} | x_t, x_0) variance

    def to(self, device: Any, dtype: torch.dtype) -> Schedule:
        for name in ("logsnr", "beta", "alpha", "alpha_bar", "alpha_bar_prev", "beta_tilde"):
            setattr(self, name, getattr(self, name).to(device=device, dtype=dtype))
        return self


class Block(nn.Module):
    """A pre-norm residual MLP block with the time embedding added to its hidden layer."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.inner = nn.Linear(hidden, hidden)
        self.outer = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        return h + self.outer(nn.functional.silu(self.inner(nn.functional.silu(self.norm(h))) + emb))


class Denoiser(nn.Module):
    """:math:`(\\epsilon_\\theta, v_\\theta)(x_t, t)`: a residual MLP on the image, conditioned on a
    sinusoidal embedding of :math:`\\log\\mathrm{SNR}_t`; returns ``[..., 3 * 64]``."""

    def __init__(self, hidden: int = 256, blocks: int = 2, embed: int = 32) -> None:
        super().__init__()
        self.embed = embed
        self.time = nn.Sequential(nn.Linear(embed, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(PIXELS, hidden)
        self.blocks = nn.ModuleList(Block(hidden) for _ in range(blocks))
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, 3 * PIXELS)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, logsnr: Tensor) -> Tensor:
        freqs = torch.exp(-math.log(100.0) * torch.arange(self.embed // 2, device=x.device) / (self.embed // 2))
        angle = logsnr * 10 * freqs.to(x.dtype)
        emb = self.time(torch.cat([angle.sin(), angle.cos()]))
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(nn.functional.silu(self.norm(h)))


class DiscretizedGaussian(dist.TorchDistribution):
    """A Gaussian on [-1, 1] binned into ``LEVELS`` grey levels ``0..LEVELS-1`` (the outer bins
    extend to infinity), as the DDPM decoder (Ho et al., 2020)."""

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.integer_interval(0, LEVELS - 1)

    def __init__(self, loc: Tensor, scale: Tensor, validate_args: bool | None = None) -> None:
        self.loc, self.scale = torch.broadcast_tensors(loc, scale)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape: Any, _instance: Any = None) -> DiscretizedGaussian:
        return DiscretizedGaussian(self.loc.expand(batch_shape), self.scale.expand(batch_shape))

    def sample(self, sample_shape: Any = ()) -> Tensor:
        with torch.no_grad():
            x = self.loc + self.scale * torch.randn(torch.Size(sample_shape) + self.loc.shape, device=self.loc.device)
            return ((x + 1) / (2 * HALF_BIN)).round().clamp(0, LEVELS - 1)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        center = value * 2 * HALF_BIN - 1
        lo = torch.where(value <= 0, -math.inf, (center - HALF_BIN - self.loc) / self.scale)
        hi = torch.where(value >= LEVELS - 1, math.inf, (center + HALF_BIN - self.loc) / self.scale)
        flip = lo + hi > 0  # work in the lower tail, where log_ndtr is accurate
        a, b = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
        log_b = torch.special.log_ndtr(b)
        ratio = torch.exp(torch.special.log_ndtr(a) - log_b).clamp(max=1 - 1e-12)
        return log_b + torch.log1p(-ratio)


def new_denoiser(hidden: int = 256, blocks: int = 2) -> Denoiser:
    with torch.random.fork_rng(devices=[]):  # the same initial network in every run
        torch.manual_seed(0)
        return Denoiser(hidden, blocks)


denoiser = new_denoiser()
SCHEDULE = Schedule(32)


GRID = torch.linspace(-1.0, 1.0, LEVELS)  # the grey levels' centres in [-1, 1]


def predict_x0(x_t: Tensor, t: int, s: Schedule) -> tuple[Tensor, Tensor]:
    """:math:`\\hat x_0 = E[x_0 \\mid x_t]` under a per-pixel posterior over the 17 grey levels
    :math:`c_k`, and the variance channel ``v``.

    The network gives each pixel a Gaussian belief :math:`N(m, e^{-\\ell})` about its level (from
    the whole image :math:`x_t`); the forward process gives the likelihood
    :math:`N(x_t; \\sqrt{\\bar\\alpha_t} c_k, 1 - \\bar\\alpha_t) \\propto
    \\exp(-\\mathrm{SNR}_t (x_t / \\sqrt{\\bar\\alpha_t} - c_k)^2 / 2)`. Their product over the grid
    is :math:`\\propto \\exp(-P (c_k - \\mu)^2 / 2)` with :math:`P = e^\\ell + \\mathrm{SNR}_t` and
    :math:`\\mu = (e^\\ell m + \\mathrm{SNR}_t\\, x_t / \\sqrt{\\bar\\alpha_t}) / P`, and
    :math:`\\hat x_0` is its mean: at high SNR it snaps to the nearest level without the network
    having to learn rounding (as the score interpolation of Dieleman et al., 2022)."""
    i = t - 1
    out = denoiser(x_t, s.logsnr[i])
    m, log_prec, v = out[..., :PIXELS], out[..., PIXELS : 2 * PIXELS], out[..., 2 * PIXELS :]
    prec, snr = log_prec.clamp(-10, 10).exp(), s.logsnr[i].exp()
    precision = prec + snr
    mu = (prec * m + snr * x_t / s.alpha_bar[i].sqrt()) / precision
    grid = GRID.to(x_t)
    logits = -0.5 * precision.unsqueeze(-1) * (grid - mu.unsqueeze(-1)).square()
    return (logits.softmax(-1) * grid).sum(-1), v


def reverse_step(x_t: Tensor, t: int, s: Schedule) -> tuple[Tensor, Tensor]:
    """Mean and scale of :math:`p_\\theta(x_{t-1} \\mid x_t)`: the forward posterior mean
    :math:`\\tilde\\mu(x_t, \\hat x_0)` and the learned variance; at ``t = 1`` the decoder's
    location :math:`\\hat x_0` and scale :math:`\\sqrt{\\beta_1} e^{v/2}`."""
    i = t - 1
    x0, v = predict_x0(x_t, t, s)
    if t == 1:
        return x0, (0.5 * (s.beta[0].log() + v)).exp()
    c0 = s.alpha_bar_prev[i].sqrt() * s.beta[i] / (1 - s.alpha_bar[i])
    ct = s.alpha[i].sqrt() * (1 - s.alpha_bar_prev[i]) / (1 - s.alpha_bar[i])
    log_beta, log_tilde = s.beta[i].log(), s.beta_tilde[i].log()
    log_var = log_tilde + (0.5 + v) * (log_beta - log_tilde)
    return c0 * x0 + ct * x_t, (0.5 * log_var).exp()


def model(levels: Tensor | None, num_images: int | None = None) -> Tensor:
    """The reverse process; ``levels`` are the observed grey levels ``[N, 64]`` (``None``: sample)."""
    pyro.module("denoiser", denoiser)
    s = SCHEDULE
    n = levels.shape[0] if levels is not None else num_images
    like = levels if levels is not None else s.beta
    with pyro.plate("data", n):
        x = pyro.sample(f"x_{s.T}", dist.Normal(like.new_zeros(PIXELS), 1.0).to_event(1))
        for t in range(s.T, 1, -1):
            x = pyro.sample(f"x_{t - 1}", dist.Normal(*reverse_step(x, t, s)).to_event(1))
        return pyro.sample("x_0", DiscretizedGaussian(*reverse_step(x, 1, s)).to_event(1), obs=levels)


def guide(levels: Tensor, num_images: int | None = None) -> None:
    """The fixed forward process :math:`q(x_{1:T} \\mid x_0)`, sampled from ``x_T`` down."""
    s = SCHEDULE
    x0 = levels * 2 * HALF_BIN - 1
    with pyro.plate("data", levels.shape[0]):
        ab = s.alpha_bar[-1]
        x = pyro.sample(f"x_{s.T}", dist.Normal(ab.sqrt() * x0, (1 - ab).sqrt()).to_event(1))
        for t in range(s.T, 1, -1):
            i = t - 1
            c0 = s.alpha_bar_prev[i].sqrt() * s.beta[i] / (1 - s.alpha_bar[i])
            ct = s.alpha[i].sqrt() * (1 - s.alpha_bar_prev[i]) / (1 - s.alpha_bar[i])
            x = pyro.sample(f"x_{t - 1}", dist.Normal(c0 * x0 + ct * x, s.beta_tilde[i].sqrt()).to_event(1))


def load_levels() -> tuple[Tensor, Tensor]:
    """Digits as grey levels 0..16: 1437 training and 360 test images (a fixed split)."""
    from sklearn.datasets import load_digits

    images = torch.as_tensor(load_digits().data, dtype=torch.get_default_dtype())
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return images[perm[:1437]], images[perm[1437:]]


def data() -> tuple[Tensor]:
    """The model's arguments, for ``pyro-elbo run``: 256 training images."""
    return (load_levels()[0][:256],)


def objective() -> Any:
    """The ELBO with closed-form KL terms for the ``T`` latent images."""
    import pyro_elbo

    return pyro_elbo.ELBO(analytic_kl=True)


def bits(nats: Tensor | float) -> float:
    """Nats per image to bits per pixel."""
    return float(nats) / (PIXELS * math.log(2))


def elbo_terms(levels: Tensor, draws: int = 4) -> dict[str, float]:
    """The negative ELBO split into its terms, in bits per pixel, averaged over ``levels`` and
    ``draws`` runs of the guide: ``L_T`` (prior KL), ``L_1..L_{T-1}`` (the reverse-step KLs,
    summed) and ``L_0`` (the decoder's :math:`-\\log p_\\theta(x_0 \\mid x_1)`)."""
    prior = f"x_{SCHEDULE.T}"
    terms = {"L_T": 0.0, "L_1..L_{T-1}": 0.0, "L_0": 0.0}
    with torch.no_grad():
        for _ in range(draws):
            q = poutine.trace(guide).get_trace(levels)
            p = poutine.trace(poutine.replay(model, trace=q)).get_trace(levels)
            for name, site in p.nodes.items():
                if site["type"] != "sample" or not name.startswith("x_"):
                    continue
                if site["is_observed"]:
                    terms["L_0"] += bits(-site["fn"].log_prob(site["value"]).mean()) / draws
                    continue
                kl = bits(torch.distributions.kl_divergence(q.nodes[name]["fn"], site["fn"]).mean())
                terms["L_T" if name == prior else "L_1..L_{T-1}"] += kl / draws
    terms["-ELBO"] = sum(terms.values())
    return terms


def independent_pixels(train: Tensor, test: Tensor, pseudo: float = 0.5) -> tuple[float, float]:
    """Bits per pixel (and standard error) of the test set under a categorical per pixel over the
    17 levels, fitted on ``train`` with ``pseudo`` counts per level (Jeffreys prior)."""
    counts = torch.stack([(train == k).sum(0) for k in range(LEVELS)], -1).double() + pseudo  # [64, 17]
    log_p = (counts / counts.sum(-1, keepdim=True)).log()
    per_image = log_p[torch.arange(PIXELS, device=test.device), test.long()].sum(-1)  # [N]
    return bits(-per_image.mean()), bits(per_image.std() / len(test) ** 0.5)


def ema_callback(module: nn.Module, decay: float) -> tuple[Callable[[int, float], None], dict[str, Tensor]]:
    """A ``fit`` callback keeping an exponential moving average of ``module``'s parameters (with
    the usual warm-up, ``min(decay, (1 + step) / (10 + step))``), and the average it updates."""
    average = {name: p.detach().clone() for name, p in module.named_parameters()}

    def update(step: int, loss: float) -> None:
        rate = 1 - min(decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, p in module.named_parameters():
                average[name].lerp_(p.detach(), rate)

    return update, average


def warmup_cosine(total: int, warmup: int = 50, floor: float = 0.02) -> Callable[[torch.optim.Optimizer], Any]:
    """An lr schedule for ``fit``: linear warm-up over ``warmup`` steps, then cosine decay to ``floor``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        done = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * done))

    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor)


def save_samples(path: str, num: int = 64) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with torch.no_grad():
        images = model(None, num).reshape(num, 8, 8).cpu()
    side = int(math.ceil(math.sqrt(num)))
    fig, axes = plt.subplots(side, side, figsize=(side, side))
    for ax, image in zip(axes.flat, images):
        ax.imshow(image, cmap="gray_r", vmin=0, vmax=LEVELS - 1)
        ax.axis("off")
    fig.suptitle(f"Diffusion model samples (T={SCHEDULE.T})")
    fig.savefig(path, dpi=80, bbox_inches="tight")  # left open: the gallery shows it


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n")[0])
    parser.add_argument("--T", type=int, default=32, help="diffusion steps")
    parser.add_argument("--logsnr-max", type=float, default=8.0, help="log SNR of x_1")
    parser.add_argument("--logsnr-min", type=float, default=-6.0, help="log SNR of x_T")
    parser.add_argument("--schedule", choices=("cosine", "linear"), default="linear", help="spacing of log SNR")
    parser.add_argument("--hidden", type=int, default=256, help="width of the denoiser")
    parser.add_argument("--blocks", type=int, default=2, help="residual blocks of the denoiser")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ema", type=float, default=0.995, help="decay of the parameter average")
    parser.add_argument("--compile", action="store_true", help="fit(compile=True); slow to compile at T=32 on CPU")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iwae-particles", type=int, default=256)
    parser.add_argument("--ais-chains", type=int, default=4)
    parser.add_argument("--ais-steps", type=int, default=100)
    parser.add_argument("--ais-points", type=int, default=50, help="test images scored by AIS (0: no AIS)")
    parser.add_argument("--gap-particles", type=int, default=500)
    parser.add_argument("--png", default="diffusion_digits_samples.png")
    return parser.parse_args()


def train(args: argparse.Namespace, images: Tensor) -> float:
    """Fit the denoiser with ``ELBO(analytic_kl=True)``; returns the seconds it took."""
    import pyro_elbo

    loader = torch.utils.data.DataLoader(
        images, batch_size=args.batch, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(args.seed)
    )
    update, average = ema_callback(denoiser, args.ema)
    start = time.perf_counter()
    result = pyro_elbo.fit(
        model,
        guide,
        loader,
        objective=objective(),
        num_steps=args.steps,
        lr=args.lr,
        scheduler=warmup_cosine(args.steps),
        seed=args.seed,
        progress=False,
        compile=args.compile,
        callbacks=[update],
    )
    seconds = time.perf_counter() - start
    with torch.no_grad():
        for name, p in denoiser.named_parameters():
            p.copy_(average[name])
    print(
        f"trained {result.num_steps} steps in {seconds:.0f} s (T={args.T}, {args.hidden}x{args.blocks} denoiser"
        f"{', compiled' if args.compile else ''}); last loss {bits(result.history[-1] / args.batch):.3f} bits/dim"
    )
    return seconds


def main() -> None:
    import pyro_elbo

    global SCHEDULE, denoiser
    args = parse_args()
    device = torch.device(args.device)
    SCHEDULE = Schedule(args.T, args.logsnr_max, args.logsnr_min, args.schedule).to(device, torch.get_default_dtype())
    denoiser = new_denoiser(args.hidden, args.blocks).to(device)
    pyro.clear_param_store()
    train_images, test = (x.to(device) for x in load_levels())
    base, base_se = independent_pixels(train_images, test)
    print(
        f"baselines on {len(test)} test images: uniform over {LEVELS} levels {math.log2(LEVELS):.3f} bits/dim; "
        f"independent per-pixel categorical {base:.3f} +- {base_se:.3f}"
    )
    train(args, train_images)
    terms = elbo_terms(test)
    print("test -ELBO in bits/dim: " + ", ".join(f"{k} {v:.3f}" for k, v in terms.items()))
    start = time.perf_counter()
    iwae = pyro_elbo.log_evidence(model, guide, test, num_particles=args.iwae_particles, chunk_size=64)
    print(
        f"test NLL, IWAE_{args.iwae_particles} on {len(test)} images: {iwae.bits_per_dim} bits/dim "
        f"({time.perf_counter() - start:.0f} s)"
    )
    if args.ais_points > 0:
        start = time.perf_counter()
        sub = test[: args.ais_points]
        ais = pyro_elbo.log_evidence(
            model, guide, sub, num_particles=args.ais_chains, method="ais", num_steps=args.ais_steps, transition="mala"
        )
        same = pyro_elbo.log_evidence(model, guide, sub, num_particles=ais.num_evals, chunk_size=256)
        print(
            f"on {len(sub)} test images: AIS ({args.ais_chains} chains x {args.ais_steps} steps, acceptance "
            f"{float(ais.acceptance_rate.mean()) if ais.acceptance_rate is not None else math.nan:.2f}) {ais.bits_per_dim} bits/dim; IWAE at equal cost "
            f"({ais.num_evals} particles) {same.bits_per_dim} ({time.perf_counter() - start:.0f} s)"
        )
    save_samples(args.png)
    print(f"samples: {args.png}")
    report = pyro_elbo.kl_gap(
        model, guide, test[:100], num_particles=args.gap_particles, chunk_size=100, per_site=False
    )
    print(report)


if __name__ == "__main__":
    main()
