"""A variational autoencoder on scikit-learn's 8x8 digits, trained with IWAE or DReG
=================================================================================

Every site sits in the ``data`` plate, so the importance-weighted bounds are per image (Pyro's
own ``RenyiELBO`` would collapse them into one joint bound). Run it as a script::

    python examples/vae_digits.py --objective dreg --particles 16 --steps 2000

or through the command line: ``pyro-elbo run examples/vae_digits.py --objective dreg``.
"""

from __future__ import annotations

import argparse

import pyro
import pyro.distributions as dist
import torch
from torch import nn

LATENT = 8
HIDDEN = 128


class Encoder(nn.Module):
    def __init__(self, pixels: int = 64, hidden: int = HIDDEN, latent: int = LATENT) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(pixels, hidden), nn.Tanh(), nn.Linear(hidden, 2 * latent))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, log_scale = self.net(x).chunk(2, -1)
        return loc, log_scale.clamp(-6, 3).exp()


class Decoder(nn.Module):
    def __init__(self, pixels: int = 64, hidden: int = HIDDEN, latent: int = LATENT) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent, hidden), nn.Tanh(), nn.Linear(hidden, pixels))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


with torch.random.fork_rng(devices=[]):  # the same initial networks in every run
    torch.manual_seed(0)
    encoder = Encoder()
    decoder = Decoder()


def model(x: torch.Tensor) -> None:
    pyro.module("decoder", decoder)
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(LATENT), 1.0).to_event(1))
        pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)


def guide(x: torch.Tensor) -> None:
    pyro.module("encoder", encoder)
    loc, scale = encoder(x)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def load_digits(batch: int | None = None, seed: int = 0) -> torch.Tensor:
    """Binarized 8x8 digits (1797 images) from scikit-learn; no download."""
    from sklearn.datasets import load_digits as sk_load_digits

    images = torch.as_tensor(sk_load_digits().data, dtype=torch.get_default_dtype())
    binary = (images > 7).to(images.dtype)
    if batch is not None:
        idx = torch.randperm(len(binary), generator=torch.Generator().manual_seed(seed))[:batch]
        binary = binary[idx]
    return binary


def data() -> tuple[torch.Tensor]:
    """The model's arguments, for ``pyro-elbo run``: 256 images."""
    return (load_digits(256),)


def split_digits(test_size: int = 360, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Binarized digits split once (a fixed permutation) into training and held-out test images."""
    images = load_digits()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images[order[test_size:]], images[order[:test_size]]


def independent_pixels_nats(train: torch.Tensor, test: torch.Tensor) -> float:
    """Held-out log-likelihood per image of the simplest honest baseline: each pixel an independent
    Bernoulli with its training frequency (add-one smoothed)."""
    p = (train.sum(0) + 1) / (len(train) + 2)
    return float(dist.Bernoulli(probs=p).log_prob(test).sum(-1).mean())


def main() -> None:
    import pyro_elbo
    from pyro_elbo.evidence import log_evidence

    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n")[0])
    parser.add_argument("--objective", default="dreg")
    parser.add_argument("--particles", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--test-particles", type=int, default=5000, help="IWAE particles per held-out image")
    args = parser.parse_args()
    pyro.set_rng_seed(0)
    train, test = split_digits()
    objective = pyro_elbo.make_objective(args.objective, num_particles=args.particles)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=objective)
    for step in range(args.steps):
        batch = train[torch.randint(len(train), (args.batch,))]
        loss = svi.step(batch) / args.batch
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss per image {loss:8.3f}")
    # Test log-likelihood as VAE papers report it: IWAE with K particles per held-out image
    # (Burda et al., 2016), per image with standard errors; a stochastic lower bound on log p(x).
    evidence = log_evidence(model, guide, test, num_particles=args.test_particles, chunk_size=500, progress=False)
    print(
        f"held-out log p(x) per image on {len(test)} test images, IWAE_{args.test_particles}: "
        f"{evidence.mean} nats, {evidence.bits_per_dim} bits/dim"
    )
    print(f"independent-pixel baseline on the same images: {independent_pixels_nats(train, test):.2f} nats per image")


if __name__ == "__main__":
    main()
