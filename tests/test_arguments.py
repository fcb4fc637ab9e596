"""fit's arguments: each mistake is refused at the call, naming the argument and what to pass."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import pyro_elbo


def model(x: torch.Tensor, y: torch.Tensor) -> None:
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(loc + 0 * x, 1.0), obs=y)


def guide(x: torch.Tensor, y: torch.Tensor) -> None:
    a = pyro.param("a", torch.tensor(0.0))
    s = pyro.param("s", torch.tensor(1.0), constraint=dist.constraints.positive)
    pyro.sample("loc", dist.Normal(a, s))


X, Y = torch.randn(12), torch.randn(12) + 1.0


def test_an_empty_dataloader_is_named() -> None:
    empty = DataLoader(TensorDataset(torch.zeros(0), torch.zeros(0)), batch_size=4)
    with pytest.raises(
        ValueError, match=r"the DataLoader yields no batches \(len\(loader\) == 0: 0 rows, batch_size=4"
    ):
        pyro_elbo.fit(model, guide, empty, progress=False)
    dropped = DataLoader(TensorDataset(X, Y), batch_size=20, drop_last=True)
    with pytest.raises(ValueError, match="12 rows, batch_size=20, drop_last=True"):
        pyro_elbo.fit(model, guide, dropped, progress=False)


def test_batches_passed_as_the_model_argument_are_refused() -> None:
    loader = DataLoader(TensorDataset(X, Y), batch_size=4)
    generator = ((x, y) for x, y in loader)
    for stream, kind in ((generator, "generator"), (iter(loader), "_SingleProcessDataLoaderIter")):
        with pytest.raises(TypeError, match=rf"fit got an iterator \({kind}\).*Pass a torch.utils.data.DataLoader"):
            pyro_elbo.fit(model, guide, stream, num_steps=2, progress=False)
    with pytest.raises(TypeError, match=r"fit got a list of 3 batches as the model's only argument"):
        pyro_elbo.fit(model, guide, list(loader), num_steps=2, progress=False)


class Stream(IterableDataset):
    """Rows of an unknown count (no __len__), as a reader of a file or a socket yields them."""

    def __iter__(self):
        return iter(zip(X.tolist(), Y.tolist()))


def test_an_unsized_stream_trains_for_num_steps_and_needs_it() -> None:
    loader = DataLoader(Stream(), batch_size=5)
    result = pyro_elbo.fit(model, guide, loader, num_steps=7, progress=False)  # 3 batches a pass
    assert result.num_steps == 7
    with pytest.raises(
        ValueError, match="IterableDataset has no len\\(\\), so fit cannot count epochs: pass num_steps"
    ):
        pyro_elbo.fit(model, guide, loader, num_epochs=2, progress=False)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"num_steps": 2.5}, TypeError, r"num_steps must be an int, got 2.5 \(float\)"),
        ({"num_steps": "100"}, TypeError, r"num_steps must be an int, got '100' \(str\)"),
        ({"num_steps": -1}, ValueError, "num_steps must be >= 0, got -1"),
        ({"checkpoint_every": 0}, ValueError, "checkpoint_every must be >= 1, got 0"),
        ({"lr": float("inf")}, ValueError, "lr must be a finite number >= 0, got inf"),
        ({"lr": float("nan")}, ValueError, "lr must be a finite number >= 0, got nan"),
    ],
)
def test_bad_counts_and_learning_rates_are_named(options: dict, error: type, match: str) -> None:
    steps: list[int] = []
    with pytest.raises(error, match=match):
        pyro_elbo.fit(model, guide, X, Y, progress=False, callbacks=[lambda step, loss: steps.append(step)], **options)
    assert steps == []


def test_eager_skip_passes_a_nan_batch_under_pyro_validation() -> None:
    """With Pyro's validation on (as users run it) a NaN batch fails inside a distribution before
    any loss exists: the eager path skips that step, as the compiled path does."""
    x = torch.arange(12.0)
    y = torch.randn(12) + 1.0
    y[5] = float("nan")
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # the second batch holds the NaN
    with pytest.raises(ValueError, match="found invalid values"):  # "raise" keeps Pyro's named error
        pyro_elbo.fit(model, guide, loader, num_epochs=1, progress=False)
    result = pyro_elbo.fit(model, guide, loader, num_epochs=2, on_nonfinite="skip", progress=False)
    assert result.num_skipped == 2 and result.num_steps == 6
    assert [i for i, loss in enumerate(result.history) if loss != loss] == [1, 4]
