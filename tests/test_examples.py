"""Every example runs in a short mode."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

SHORT = {
    "diffusion_digits.py": ["--steps", "5", "--T", "4", "--iwae-particles", "4", "--ais-points", "2",
                            "--ais-steps", "2", "--ais-chains", "2", "--gap-particles", "10",
                            "--png", "/tmp/pyro_elbo_diffusion_test.png"],
    "eight_schools.py": ["50", "500"],
    "logistic_regression.py": ["30"],
    "mixture_vimco.py": ["30"],
    "vae_digits.py": ["--steps", "10", "--batch", "32", "--test-particles", "20"],
}


def test_every_example_has_a_short_mode() -> None:
    assert {p.name for p in EXAMPLES.glob("*.py")} == set(SHORT)


@pytest.mark.parametrize("name", sorted(SHORT))
def test_example_runs(name: str) -> None:
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *SHORT[name]], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()
