"""Training from a DataLoader, with checkpoints, a resume, and the finished run loaded for analysis
===================================================================================================

A Bayesian linear regression on 500 generated points, trained on minibatches of 50: the
``DataLoader`` yields ``(index, x, y)``, which :func:`pyro_elbo.fit` passes to the model as its
three positional arguments, and the model's ``pyro.plate("data", N, subsample=index)`` scales each
minibatch's log-likelihood by ``N / 50``. The run writes a checkpoint, stops after five epochs as an
interrupted run would, resumes to the end from the checkpoint, and the finished run is then
loaded into a fresh guide with :func:`pyro_elbo.load` (no training) for the KL-gap report on all
the data: with minibatches the guide keeps moving around its optimum (each step's gradient is
noisy), and the report says how far from the posterior that leaves it. Run::

    python examples/dataloader_checkpoints.py [epochs]
    pyro-elbo run examples/dataloader_checkpoints.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

N, D, BATCH = 500, 3, 50


def model(index: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    w = pyro.sample("w", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
    sigma = pyro.sample("sigma", dist.LogNormal(x.new_zeros(()), 1.0))
    with pyro.plate("data", N, subsample=index):
        pyro.sample("y", dist.Normal((x * w).sum(-1), sigma), obs=y)


def full_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every point with its index: ``w = (1, -2, 0.5)``, noise sd 0.5, the same in every run."""
    gen = torch.Generator().manual_seed(0)
    dtype = torch.get_default_dtype()
    x = torch.randn(N, D, generator=gen).to(dtype)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=dtype) + 0.5 * torch.randn(N, generator=gen).to(dtype)
    return torch.arange(N), x, y


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One minibatch (for ``pyro-elbo run``, which trains on fixed arguments)."""
    index, x, y = full_data()
    return index[:BATCH], x[:BATCH], y[:BATCH]


def main(epochs: int = 60) -> None:
    from pyro.infer.autoguide import AutoNormal
    from torch.utils.data import DataLoader, TensorDataset

    import pyro_elbo

    loader = DataLoader(TensorDataset(*full_data()), batch_size=BATCH, shuffle=True)
    options = dict(objective=pyro_elbo.ELBO(num_particles=4), lr=0.02, seed=0, progress=False)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "run.pt"
        pyro.clear_param_store()
        first = pyro_elbo.fit(model, AutoNormal(model), loader, num_epochs=5, checkpoint=checkpoint, **options)
        print("stopped early:", first)
        pyro.clear_param_store()
        resumed = pyro_elbo.fit(
            model, AutoNormal(model), loader, num_epochs=epochs, checkpoint=checkpoint, resume=True, **options
        )
        print(f"resumed from step {resumed.resumed_from_step}:", resumed)

        pyro.clear_param_store()
        guide = AutoNormal(model)
        loaded = pyro_elbo.load(checkpoint, model, guide, *data())
    print("loaded:", loaded)
    print("posterior median of w:", guide.median()["w"].tolist(), "(true: [1.0, -2.0, 0.5])")
    print(pyro_elbo.kl_gap(model, guide, *full_data(), num_particles=2000))
    loaded.plot()


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
