"""A diffusion model on scikit-learn's 8x8 digits, written as a Pyro program and scored per image.

A diffusion model is a hierarchical VAE with ``T`` latent images ``x_1..x_T``:

* the **guide** is the fixed forward noising process :math:`q(x_{1:T} \\mid x_0)` with
  :math:`q(x_t \\mid x_{t-1}) = N(\\sqrt{1-\\beta_t}\\, x_{t-1}, \\beta_t I)`, written in its
  reverse factorization :math:`q(x_T \\mid x_0) \\prod_t q(x_{t-1} \\mid x_t, x_0)` (the same joint,
  with Gaussian conditionals in closed form), so each model site has a guide site of the same
  family and its KL term can be analytic;
* the **model** is the learned reverse process :math:`p(x_T) \\prod_t p_\\theta(x_{t-1} \\mid x_t)`
  with one shared denoising network :math:`\\epsilon_\\theta(x_t, t)`, variances
  :math:`\\tilde\\beta_t`, and a discretized Gaussian decoder :math:`p_\\theta(x_0 \\mid x_1)` over
  the 17 grey levels, so that :math:`-\\log p(x_0)` is a code length in bits per pixel.

Its ELBO is the sum of the DDPM loss terms. It is trained with :func:`pyro_elbo.fit`, and the
test set is scored with :func:`pyro_elbo.evidence.log_evidence` (IWAE and AIS), which gives the
test negative log-likelihood in bits per dimension; samples go to a PNG::

    python examples/diffusion_digits.py --steps 1500 --png docs/diffusion_digits_samples.png

References:
    | Denoising Diffusion Probabilistic Models (Ho et al., 2020)
    | https://arxiv.org/abs/2006.11239
    | Deep Unsupervised Learning using Nonequilibrium Thermodynamics (Sohl-Dickstein et al., 2015)
    | https://arxiv.org/abs/1503.03585
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import Tensor, nn

LEVELS = 17  # grey levels 0..16 of the digits
HALF_BIN = 1.0 / (LEVELS - 1)  # pixels live on [-1, 1], bins of width 2 / 16


class Schedule:
    """Forward-process constants for ``T`` steps (linear betas)."""

    def __init__(self, T: int, beta_min: float = 1e-3, beta_max: float = 0.4) -> None:
        self.T = T
        self.beta = torch.linspace(beta_min, beta_max * 32 / T, T).clamp(max=0.999)
        self.alpha = 1 - self.beta
        self.alpha_bar = torch.cumprod(self.alpha, 0)
        prev = torch.cat([torch.ones(1), self.alpha_bar[:-1]])
        self.alpha_bar_prev = prev
        self.beta_tilde = (1 - prev) / (1 - self.alpha_bar) * self.beta  # q(x_{t-1} | x_t, x_0) variance

    def to(self, device: Any, dtype: torch.dtype) -> Schedule:
        for name in ("beta", "alpha", "alpha_bar", "alpha_bar_prev", "beta_tilde"):
            setattr(self, name, getattr(self, name).to(device=device, dtype=dtype))
        return self


class Denoiser(nn.Module):
    """:math:`\\epsilon_\\theta(x_t, t)`: an MLP on the image and a sinusoidal embedding of t."""

    def __init__(self, pixels: int = 64, hidden: int = 128, embed: int = 32) -> None:
        super().__init__()
        self.embed = embed
        self.net = nn.Sequential(
            nn.Linear(pixels + embed, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, pixels),
        )

    def forward(self, x: Tensor, t: int) -> Tensor:
        freqs = torch.exp(-math.log(1000.0) * torch.arange(self.embed // 2, device=x.device) / (self.embed // 2))
        angle = t * freqs.to(x.dtype)
        emb = torch.cat([angle.sin(), angle.cos()]).expand(*x.shape[:-1], self.embed)
        return self.net(torch.cat([x, emb], -1))


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


with torch.random.fork_rng(devices=[]):  # the same initial network in every run
    torch.manual_seed(0)
    denoiser = Denoiser()
SCHEDULE = Schedule(16)


def reverse_mean(x_t: Tensor, t: int, s: Schedule) -> Tensor:
    """:math:`\\mu_\\theta(x_t, t) = (x_t - \\beta_t \\epsilon_\\theta / \\sqrt{1 - \\bar\\alpha_t}) / \\sqrt{\\alpha_t}`."""
    i = t - 1
    eps = denoiser(x_t, t)
    return (x_t - s.beta[i] / (1 - s.alpha_bar[i]).sqrt() * eps) / s.alpha[i].sqrt()


def model(levels: Tensor | None, num_images: int | None = None) -> Tensor:
    """The reverse process; ``levels`` are the observed grey levels ``[N, 64]`` (``None``: sample)."""
    pyro.module("denoiser", denoiser)
    s = SCHEDULE
    n = levels.shape[0] if levels is not None else num_images
    like = levels if levels is not None else s.beta
    with pyro.plate("data", n):
        x = pyro.sample(f"x_{s.T}", dist.Normal(like.new_zeros(64), 1.0).to_event(1))
        for t in range(s.T, 1, -1):
            x = pyro.sample(f"x_{t - 1}", dist.Normal(reverse_mean(x, t, s), s.beta_tilde[t - 1].sqrt()).to_event(1))
        decoder = DiscretizedGaussian(reverse_mean(x, 1, s), s.beta[0].sqrt().expand(64))
        return pyro.sample("x_0", decoder.to_event(1), obs=levels)


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
    """``ELBO(analytic_kl=True)`` where this pyro_elbo has it, else the Monte Carlo ELBO."""
    import pyro_elbo

    try:
        return pyro_elbo.ELBO(analytic_kl=True)
    except TypeError:
        return pyro_elbo.ELBO()


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
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    import pyro_elbo
    from pyro_elbo.evidence import log_evidence

    global SCHEDULE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=16, help="diffusion steps")
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iwae-particles", type=int, default=256)
    parser.add_argument("--ais-chains", type=int, default=4)
    parser.add_argument("--ais-steps", type=int, default=100)
    parser.add_argument("--ais-points", type=int, default=100, help="test images scored by AIS")
    parser.add_argument("--gap-particles", type=int, default=1000)
    parser.add_argument("--png", default="diffusion_digits_samples.png")
    args = parser.parse_args()
    device = torch.device(args.device)
    SCHEDULE = Schedule(args.T).to(device, torch.get_default_dtype())
    denoiser.to(device)
    train, test = (x.to(device) for x in load_levels())
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch, shuffle=True, drop_last=True)
    epochs = math.ceil(args.steps / len(loader))
    start = time.perf_counter()
    result = pyro_elbo.fit(model, guide, loader, objective=objective(), num_epochs=epochs, num_steps=args.steps,
                           lr=args.lr, seed=0, progress=False)
    train_s = time.perf_counter() - start
    print(f"trained {result.num_steps} steps in {train_s:.0f} s with {type(objective()).__name__}"
          f"; final loss per image {result.history[-1] / args.batch:.2f} nats")
    start = time.perf_counter()
    with torch.no_grad():
        iwae = log_evidence(model, guide, test, num_particles=args.iwae_particles, chunk_size=64)
    print(f"test NLL, IWAE_{args.iwae_particles} on {len(test)} images: {iwae.bits_per_dim} bits/dim "
          f"({time.perf_counter() - start:.0f} s)")
    start = time.perf_counter()
    sub = test[: args.ais_points]
    ais = log_evidence(model, guide, sub, num_particles=args.ais_chains, method="ais", num_steps=args.ais_steps,
                       transition="mala")
    same = log_evidence(model, guide, sub, num_particles=ais.num_evals, chunk_size=256)
    print(f"on {len(sub)} test images: AIS ({args.ais_chains} chains x {args.ais_steps} steps, acceptance "
          f"{float(ais.acceptance_rate.mean()):.2f}) {ais.bits_per_dim} bits/dim; IWAE at equal cost "
          f"({ais.num_evals} particles) {same.bits_per_dim} ({time.perf_counter() - start:.0f} s)")
    save_samples(args.png)
    print(f"samples: {args.png}")
    report = pyro_elbo.kl_gap(model, guide, test[:100], num_particles=args.gap_particles, chunk_size=100,
                              per_site=False)
    print(report)


if __name__ == "__main__":
    main()
