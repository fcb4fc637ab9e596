"""The pyro-elbo command: end to end on a bundled example, and one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pyro_elbo(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyro_elbo.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_run_end_to_end(tmp_path: Path) -> None:
    result = pyro_elbo("run", str(ROOT / "examples" / "eight_schools.py"), "--steps", "60", "--samples", "200",
                       "--diagnostic-particles", "500", "--out", "out", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "KL-gap report" in result.stdout and "PSIS k-hat" in result.stdout
    for name in ("inference_data.nc", "loss.png", "kl_gap.png", "posterior.png", "report.txt", "checkpoint.pt"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    resumed = pyro_elbo("run", str(ROOT / "examples" / "eight_schools.py"), "--steps", "80", "--samples", "50",
                        "--diagnostic-particles", "200", "--out", "out", "--no-progress", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step 60" in resumed.stdout


def test_help_documents_every_option(tmp_path: Path) -> None:
    top = pyro_elbo("--help", cwd=tmp_path)
    assert top.returncode == 0 and "run" in top.stdout
    run = pyro_elbo("run", "--help", cwd=tmp_path)
    for option in ("--objective", "--particles", "--steps", "--lr", "--device", "--out", "--seed", "--samples",
                   "--resume", "--guide"):
        assert option in run.stdout, option


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "missing.py"], "no such file: missing.py"),
        (["run", "{nomodel}"], "defines no function `model`"),
        (["run", "{example}", "--objective", "nope"], "unknown objective 'nope'"),
        (["run", "{example}", "--device", "tpu9"], "unknown device 'tpu9'"),
        (["run", "{example}:no_such_model"], "defines no function `no_such_model`"),
    ],
)
def test_mistakes_exit_nonzero_with_one_line_and_no_traceback(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "nomodel.py").write_text("x = 1\n")
    args = [a.format(nomodel=tmp_path / "nomodel.py", example=ROOT / "examples" / "eight_schools.py") for a in args]
    result = pyro_elbo(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_posterior_plot_of_a_large_local_latent_shows_its_first_entries(tmp_path: Path) -> None:
    import pyro
    import pyro.distributions as dist
    import torch

    import pyro_elbo
    from pyro_elbo import cli

    x = torch.randn(100)

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1), 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    idata = pyro_elbo.to_inference_data(model, guide, x, num_samples=50)

    class Figure:
        def plot(self):
            import matplotlib.pyplot as plt

            return plt.figure()

    cli._plots(Figure(), Figure(), idata, tmp_path)
    assert (tmp_path / "posterior.png").stat().st_size > 0  # 300 entries: the first 40 are drawn
