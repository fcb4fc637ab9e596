"""Every example runs in a short mode."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

SHORT = {
    "dataloader_checkpoints.py": ["8"],
    "diffusion_digits.py": (
        "--steps 5 --T 4 --hidden 32 --blocks 1 --iwae-particles 4 --ais-points 2 --ais-steps 2 --ais-chains 2"
        " --gap-particles 10 --png /tmp/pyro_elbo_diffusion_test.png"
    ).split(),
    "eight_schools.py": ["50", "500"],
    "logistic_regression.py": ["30"],
    "mixture_vimco.py": ["30"],
    "quickstart.py": ["50", "200"],
    "vae_digits.py": ["--steps", "10", "--batch", "32", "--test-particles", "20"],
}


def test_every_example_has_a_short_mode() -> None:
    assert {p.name for p in EXAMPLES.glob("*.py")} == set(SHORT)


@pytest.mark.parametrize("name", sorted(SHORT))
def test_example_runs(name: str) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *SHORT[name]], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()


def _diffusion_example(T: int) -> ModuleType:
    """The diffusion example as a module, with a ``T``-step schedule and a small denoiser."""
    spec = importlib.util.spec_from_file_location("diffusion_digits", EXAMPLES / "diffusion_digits.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.SCHEDULE = module.Schedule(T)
    module.denoiser = module.new_denoiser(hidden=16, blocks=1)
    return module


def test_diffusion_decoder_sums_to_one_over_the_grey_levels() -> None:
    ex = _diffusion_example(T=4)
    loc = torch.linspace(-1.5, 1.5, 7, dtype=torch.float64).unsqueeze(-1)
    scale = torch.tensor([1e-3, 0.05, 1.0], dtype=torch.float64)
    levels = torch.arange(ex.LEVELS, dtype=torch.float64).reshape(-1, 1, 1)
    total = ex.DiscretizedGaussian(loc, scale).log_prob(levels).exp().sum(0)  # [7, 3]
    assert torch.allclose(total, torch.ones_like(total), atol=1e-9)


def test_diffusion_x0_prediction_snaps_to_the_grey_levels_at_high_snr() -> None:
    """At log SNR 16 the noise (sd 3e-4 in data units) is far below the half bin (0.0625) and the
    likelihood's precision (9e6) far above the network's (at most e^10): the posterior over the
    levels is a point mass on the true level whatever the network says."""
    ex = _diffusion_example(T=4)
    ex.SCHEDULE.logsnr[0] = 16.0
    ex.SCHEDULE.alpha_bar[0] = torch.sigmoid(torch.tensor(16.0))
    torch.nn.init.normal_(ex.denoiser.out.weight)  # an arbitrary (untrained) belief
    levels = ex.load_levels()[1][:8]
    x0 = levels * 2 / (ex.LEVELS - 1) - 1
    x_t = ex.SCHEDULE.alpha_bar[0].sqrt() * (x0 + torch.randn_like(x0) * torch.tensor(-8.0).exp())
    with torch.no_grad():
        predicted, _ = ex.predict_x0(x_t, 1, ex.SCHEDULE)
    assert torch.allclose(predicted, x0, atol=1e-4)


def test_diffusion_elbo_terms_add_up_to_the_objective() -> None:
    """The example's term-by-term -ELBO (closed-form KL per step from guide and model traces) and
    ``ELBO(analytic_kl=True).loss`` estimate the same expectation over the forward process. Both
    are means of 40 independent draws; the tolerance is 4 standard errors of their difference,
    measured here (false-alarm rate 6e-5 under normality)."""
    import pyro_elbo

    torch.manual_seed(0)
    ex = _diffusion_example(T=4)
    levels = ex.load_levels()[1][:8]
    terms = torch.tensor([ex.elbo_terms(levels, draws=1)["-ELBO"] for _ in range(40)])
    objective = pyro_elbo.ELBO(analytic_kl=True)
    losses = torch.tensor([ex.bits(objective.loss(ex.model, ex.guide, levels) / len(levels)) for _ in range(40)])
    se = (terms.var() / len(terms) + losses.var() / len(losses)).sqrt()
    assert abs(terms.mean() - losses.mean()) < 4 * se
