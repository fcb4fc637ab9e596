"""Objectives on a VAE (scikit-learn digits): encoder gradient SNR, and seconds per step relative
to the same computation hand-written in plain PyTorch. Ratios are measured side by side in one
process (interleaved repeats, medians), never as absolute goals.

    python benchmarks/objectives_vae.py [--particles 16] [--batch 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
from torch.distributions import Bernoulli, Normal

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import vae_digits as vae  # noqa: E402

import pyro_elbo  # noqa: E402
from pyro_elbo.estimators import logmeanexp  # noqa: E402

NAMES = ["elbo", "stl", "iwae", "dreg", "renyi", "cubo", "vimco"]


def handwritten_loss(name: str, x: torch.Tensor, k: int) -> torch.Tensor:
    """The same objective written directly in PyTorch (the reference for speed)."""
    loc, scale = vae.encoder(x)
    z = loc + scale * torch.randn((k,) + loc.shape)
    logits = vae.decoder(z)
    log_lik = Bernoulli(logits=logits).log_prob(x).sum(-1)
    log_prior = Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_q = Normal(loc, scale).log_prob(z).sum(-1)
    log_w = log_prior + log_lik - log_q
    if name == "elbo":
        return -log_w.mean(0).sum()
    if name in ("iwae", "vimco"):
        return -logmeanexp(log_w, 0).sum()
    if name == "renyi":
        return -(logmeanexp(0.5 * log_w, 0) / 0.5).sum()
    if name == "cubo":
        frozen = {k: v.detach() for k, v in vae.decoder.named_parameters()}  # CUBO trains the guide only
        logits = torch.func.functional_call(vae.decoder, frozen, (z,))
        log_w = log_prior + Bernoulli(logits=logits).log_prob(x).sum(-1) - log_q
        return (logmeanexp(2 * log_w, 0) / 2).sum()
    log_q_stopped = Normal(loc.detach(), scale.detach()).log_prob(z).sum(-1)
    if name == "stl":
        return -(log_prior + log_lik - log_q_stopped).mean(0).sum()
    # dreg: guide gets w~^2 path gradients, decoder gets IWAE's w~ gradients
    w = torch.softmax(log_w.detach(), 0)
    zd = z.detach()
    log_p_zd = Normal(0.0, 1.0).log_prob(zd).sum(-1) + Bernoulli(logits=vae.decoder(zd)).log_prob(x).sum(-1)
    surrogate = (w**2 * (log_prior + log_lik - log_q_stopped)).sum(0) + ((w - w**2) * log_p_zd).sum(0)
    value = logmeanexp(log_w, 0)
    return -(value.detach() + surrogate - surrogate.detach()).sum()


def make_step(loss_fn, params):
    optim = torch.optim.Adam(params, lr=1e-4)

    def step(x: torch.Tensor) -> None:
        optim.zero_grad()
        loss_fn(x).backward()
        optim.step()

    return step


def time_steps(step, x: torch.Tensor, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        step(x)
    return (time.perf_counter() - start) / n


def gradient_snr(loss_fn, module: torch.nn.Module, x: torch.Tensor, draws: int) -> float:
    grads = []
    for _ in range(draws):
        module.zero_grad()
        loss_fn(x).backward()
        if any(p.grad is None for p in module.parameters()):
            return math.nan  # not trained by this objective
        grads.append(torch.cat([p.grad.flatten() for p in module.parameters()]))
    g = torch.stack(grads)
    snr = g.mean(0).abs() / g.std(0).clamp_min(1e-30)
    return float(snr.median())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--particles", type=int, default=16)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--snr-draws", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)
    images = vae.load_digits()
    x = images[: args.batch]
    params = list(vae.encoder.parameters()) + list(vae.decoder.parameters())
    # a short warm-up fit so gradients are measured away from the initialization
    warm = pyro_elbo.IWAE(num_particles=8)(vae.model, vae.guide)
    warm_step = make_step(warm, params)
    for _ in range(300):
        warm_step(images[torch.randint(len(images), (128,))])
    state = {
        k: v.clone()
        for k, v in {**vae.encoder.state_dict(), **{"d" + k: v for k, v in vae.decoder.state_dict().items()}}.items()
    }

    def restore() -> None:
        vae.encoder.load_state_dict({k: v for k, v in state.items() if not k.startswith("d")})
        vae.decoder.load_state_dict({k[1:]: v for k, v in state.items() if k.startswith("d")})

    rows = []
    for name in NAMES:
        objective = pyro_elbo.make_objective(name, num_particles=args.particles)
        ours = objective(vae.model, vae.guide)
        ref = lambda xb, name=name: handwritten_loss(name, xb, args.particles)  # noqa: E731
        restore()
        snr_enc = gradient_snr(ours, vae.encoder, x[:32], args.snr_draws)
        snr_dec = gradient_snr(ours, vae.decoder, x[:32], args.snr_draws)
        ours_step, ref_step = make_step(ours, params), make_step(ref, params)
        ours_step(x), ref_step(x)  # warm-up
        ours_t, ref_t = [], []
        for _ in range(args.repeats):
            restore()
            ours_t.append(time_steps(ours_step, x, args.steps))
            restore()
            ref_t.append(time_steps(ref_step, x, args.steps))
        rows.append((name, snr_enc, snr_dec, statistics.median(ours_t), statistics.median(ref_t)))

    print(f"VAE on digits, batch {args.batch}, K={args.particles}, {args.threads} thread(s), torch {torch.__version__}")
    print(f"median SNR = |mean g| / std g over {args.snr_draws} draws at batch 32, median over parameters")
    print()
    print("| objective | encoder SNR | decoder SNR | ms/step pyro_elbo | ms/step plain PyTorch | ratio |")
    print("|---|---|---|---|---|---|")
    for name, se, sd, ours_t, ref_t in rows:
        sd_text = "not trained" if math.isnan(sd) else f"{sd:.3f}"
        print(f"| {name} | {se:.3f} | {sd_text} | {1e3 * ours_t:.2f} | {1e3 * ref_t:.2f} | {ours_t / ref_t:.2f} |")
    assert all(math.isfinite(r[1]) for r in rows)


if __name__ == "__main__":
    main()
