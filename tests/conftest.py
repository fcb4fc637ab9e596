"""Test options: ``--device`` and ``--dtype`` feed every test; each test starts from a clean,
seeded Pyro state with validation on and warnings as errors (pyproject)."""

from __future__ import annotations

import pyro
import pytest
import torch

from pyro_elbo._pyro import supports


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="torch device for the tests (cpu, cuda)")
    parser.addoption("--dtype", default="float64", choices=["float32", "float64"], help="default dtype")


@pytest.fixture(autouse=True)
def _setup(request: pytest.FixtureRequest) -> object:
    device = torch.device(request.config.getoption("--device"))
    dtype = getattr(torch, request.config.getoption("--dtype"))
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    if device.type != "cpu":  # a default-device context slows every op, so only when needed
        torch.set_default_device(device)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    supports._warned.clear()  # each test sees its own once-per-site support warnings
    yield
    torch.set_default_dtype(old_dtype)
    torch.set_default_device("cpu")
    pyro.clear_param_store()


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.config.getoption("--device"))


@pytest.fixture
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return getattr(torch, request.config.getoption("--dtype"))
