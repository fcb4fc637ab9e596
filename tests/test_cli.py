"""The pyro-elbo command: end to end on a bundled example, and one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pyro_elbo(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pyro_elbo.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_run_end_to_end(tmp_path: Path) -> None:
    result = pyro_elbo(
        "run",
        str(ROOT / "examples" / "eight_schools.py"),
        "--steps",
        "60",
        "--samples",
        "200",
        "--diagnostic-particles",
        "500",
        "--out",
        "out",
        "--no-progress",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "KL-gap report" in result.stdout and "PSIS k-hat" in result.stdout
    assert "PSIS-LOO corrected for the guide" in result.stdout and "Pareto k-hat: of log p - log q" in result.stdout
    assert "PSIS-LOO corrected for the guide" in (tmp_path / "out" / "report.txt").read_text()
    for name in ("inference_data.nc", "loss.png", "kl_gap.png", "posterior.png", "report.txt", "checkpoint.pt"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    resumed = pyro_elbo(
        "run",
        str(ROOT / "examples" / "eight_schools.py"),
        "--steps",
        "80",
        "--samples",
        "50",
        "--diagnostic-particles",
        "200",
        "--out",
        "out",
        "--no-progress",
        "--resume",
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step 60" in resumed.stdout


def test_help_documents_every_option(tmp_path: Path) -> None:
    top = pyro_elbo("--help", cwd=tmp_path)
    assert top.returncode == 0 and "run" in top.stdout
    run = pyro_elbo("run", "--help", cwd=tmp_path)
    for option in (
        "--objective",
        "--particles",
        "--steps",
        "--lr",
        "--device",
        "--out",
        "--seed",
        "--samples",
        "--resume",
        "--guide",
        "--vectorize",
        "--dtype",
        "--log-likelihood",
        "--traceback",
    ):
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

    cli._posterior_plot(idata, tmp_path)
    assert (tmp_path / "posterior.png").stat().st_size > 0  # 300 entries: the first 40 are drawn


FAILS_AFTER_FIT = """
import pyro, pyro.distributions as dist, torch

def data():
    return (torch.linspace(-1, 1, 8),)

def model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    if mu.dim() > 0 and mu.shape[0] > 50:  # the report's and the export's vectorized draws, not the fit
        raise RuntimeError("the model cannot take many particles\\nsecond line: the hint that tells what to do")
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=x)
"""


def in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``pyro-elbo ARGS`` in this process (no interpreter start-up): exit code, stdout, stderr."""
    from pyro_elbo import cli

    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_finished_fit_is_kept_when_the_report_and_export_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fails.py").write_text(FAILS_AFTER_FIT)
    code, out, err = in_process(
        capsys,
        "run",
        "fails.py",
        "--steps",
        "20",
        "--samples",
        "100",
        "--diagnostic-particles",
        "100",
        "--vectorize",
        "plate",  # as asked: with auto, the export would draw its particles one at a time
        "--out",
        "out",
        "--no-progress",
    )
    assert code == 1, err
    assert "fit: 20 steps" in out
    for name in ("checkpoint.pt", "loss.png", "report.txt"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    assert not (tmp_path / "out" / "inference_data.nc").exists()
    assert "fit: 20 steps" in (tmp_path / "out" / "report.txt").read_text()
    for part in ("the KL-gap report failed", "the ArviZ export failed"):
        assert part in err
    assert err.count("second line: the hint that tells what to do") == 2  # the whole message, twice
    assert "the fit is kept in out/checkpoint.pt" in err
    assert "Traceback" not in err


def test_traceback_shows_an_import_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.py").write_text("import no_such_module_xyz\n")
    code, _, err = in_process(capsys, "run", "broken.py")
    assert code == 2 and "Traceback" not in err and "No module named 'no_such_module_xyz'" in err
    code, _, err = in_process(capsys, "run", "broken.py", "--traceback")
    assert code == 2
    assert "Traceback" in err and 'broken.py", line 1' in err


def test_seed_fixes_the_report_and_options_reach_the_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    example = str(ROOT / "examples" / "eight_schools.py")
    common = ["--steps", "5", "--samples", "20", "--diagnostic-particles", "200", "--no-progress"]
    runs = {
        "a": [*common, "--seed", "1", "--dtype", "float32"],
        "a2": [*common, "--seed", "1", "--dtype", "float32"],
        "b": [*common, "--seed", "2", "--vectorize", "sequential", "--dtype", "float64"],
    }
    reports = {}
    for name, args in runs.items():
        code, _, err = in_process(capsys, "run", example, *args, "--out", name)
        assert code == 0, err
        reports[name] = (tmp_path / name / "report.txt").read_text()
    assert reports["a2"] == reports["a"]
    assert reports["b"] != reports["a"]
    assert "float64" in reports["b"] and "float32" in reports["a"]


NO_PARTICLE_PLATE = """
import pyro, pyro.distributions as dist, torch

X = torch.linspace(-1, 1, 12).reshape(4, 3)

def data():
    return (X @ torch.tensor([0.5, -1.0, 2.0]),)

def model(y):
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    mean = torch.mv(X, w)  # a matrix times a vector: a particle plate's [K, 3] is refused
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mean, 0.5), obs=y)
"""


@pytest.mark.parametrize("mode", ["vmap", "sequential", "plate"])
def test_vectorize_reaches_every_library_call_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], mode: str
) -> None:
    """``--vectorize MODE`` is the library's ``vectorize_particles=MODE`` in the objective, the report
    and the export; a model that cannot take a particle plate runs with vmap and sequential, and
    the plate it was forced onto fails the report and the export (the fit, one particle, is kept)."""
    import pyro_elbo

    seen: dict[str, object] = {}

    def recording(name: str, fn):
        def wrapped(*args, **kwargs):
            seen[name] = kwargs.get("vectorize_particles")
            return fn(*args, **kwargs)

        return wrapped

    for name in ("make_objective", "kl_gap", "to_inference_data"):
        monkeypatch.setattr(pyro_elbo, name, recording(name, getattr(pyro_elbo, name)))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mv.py").write_text(NO_PARTICLE_PLATE)
    code, out, err = in_process(
        capsys,
        "run",
        "mv.py",
        "--steps",
        "3",
        "--samples",
        "10",
        "--diagnostic-particles",
        "50",
        "--no-progress",
        "--vectorize",
        mode,
        "--out",
        "out",
    )
    assert seen == {"make_objective": mode, "kl_gap": mode, "to_inference_data": mode}
    assert "fit: 3 steps" in out and (tmp_path / "out" / "checkpoint.pt").exists()
    if mode == "plate":
        assert code == 1 and "the KL-gap report failed" in err and "the ArviZ export failed" in err
        assert err.count("drawn in one vectorized pass") == 2
    else:
        assert code == 0, err
        assert (tmp_path / "out" / "inference_data.nc").stat().st_size > 0


def test_sizes_past_the_machine_are_refused_after_the_fit_with_the_option_to_lower(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """1e12 report particles (8 TB of log-weights at least) and 1e15 draws: the library's fail-fast
    messages, no traceback, the fit kept, and each option named."""
    monkeypatch.chdir(tmp_path)
    code, out, err = in_process(
        capsys,
        "run",
        str(ROOT / "examples" / "eight_schools.py"),
        "--steps",
        "3",
        "--samples",
        "1e15",
        "--diagnostic-particles",
        "1e12",
        "--no-progress",
        "--out",
        "out",
    )
    assert code == 1
    assert "fit: 3 steps" in out and (tmp_path / "out" / "checkpoint.pt").stat().st_size > 0
    assert "the KL-gap report failed: ValueError: kl_gap(num_particles=1000000000000)" in err
    assert "pyro-elbo: lower --diagnostic-particles (now 1000000000000)" in err
    assert "the ArviZ export failed: ValueError: to_inference_data(num_samples=1000000000000000)" in err
    assert "pyro-elbo: lower --samples (now 1000000000000000)" in err
    assert "the fit is kept in out/checkpoint.pt" in err and "Traceback" not in err
    assert "KL-gap report: failed" in (tmp_path / "out" / "report.txt").read_text()


def test_counts_may_be_written_in_scientific_notation() -> None:
    import argparse

    from pyro_elbo.cli import count

    assert count("1e4") == 10_000 and count("10_000") == 10_000 and count("250") == 250
    for bad in ("1.5", "1e-3", "many", "nan", "inf"):
        with pytest.raises(argparse.ArgumentTypeError, match="not a whole number"):
            count(bad)


SCOPED = """
import pyro, torch
import pyro.distributions as dist
from pyro.contrib.autoname import scope

def data():
    return (torch.linspace(-1, 1, 8),)

@scope(prefix="mix")
def model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=x)
"""


def test_site_names_netcdf_refuses_are_written_renamed_and_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``autoname.scope`` names (``mix/mu``) cannot be netCDF names: the file has ``mix.mu``, the
    renames are in its attributes, a warning names them; the file is listed as written."""
    import arviz as az

    from pyro_elbo.arviz import NetCDFRenameWarning

    monkeypatch.chdir(tmp_path)
    (tmp_path / "scoped.py").write_text(SCOPED)
    args = ("--steps", "5", "--samples", "20", "--diagnostic-particles", "20", "--out", "out", "--no-progress")
    with pytest.warns(NetCDFRenameWarning, match="'mix/mu' -> 'mix.mu'"):
        code, out, err = in_process(capsys, "run", "scoped.py", *args)
    assert code == 0, err
    assert "inference_data.nc" in out.splitlines()[-1]
    idata = az.from_netcdf(tmp_path / "out" / "inference_data.nc")
    assert "mix.mu" in idata.posterior and "mix.y" in idata.log_likelihood
    assert idata.posterior.attrs["pyro_elbo_renamed"] == '{"mix.mu": "mix/mu"}'


def test_an_output_of_an_earlier_run_is_not_listed_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import os

    monkeypatch.chdir(tmp_path)
    (tmp_path / "fails.py").write_text(FAILS_AFTER_FIT)
    (tmp_path / "out").mkdir()
    stale = tmp_path / "out" / "inference_data.nc"
    stale.write_bytes(b"an earlier run's export")
    os.utime(stale, (0, 0))
    args = ("--steps", "5", "--samples", "100", "--diagnostic-particles", "100", "--out", "out", "--no-progress")
    code, out, err = in_process(capsys, "run", "fails.py", *args)
    assert code == 1 and "the ArviZ export failed" in err
    wrote = [line for line in out.splitlines() if line.startswith("wrote ")]
    assert wrote and "inference_data.nc" not in wrote[0] and "checkpoint.pt" in wrote[0]


@pytest.mark.parametrize(
    ("given", "expected"),
    [([], "auto"), (["--compile"], True), (["--compile", "on"], True), (["--compile", "off"], False)],
)
def test_compile_defaults_to_auto_and_plain_compile_means_on(given: list[str], expected: bool | str) -> None:
    from pyro_elbo import cli

    args = cli.build_parser().parse_args(["run", "model.py", *given])
    assert cli._compile_mode(args, Path("no-such-checkpoint.pt")) == expected


def test_resume_without_compile_keeps_the_checkpoints_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run written with --compile off resumes under --resume alone (the default mode, auto, would be
    refused by fit as a changed setting); naming another mode is refused as fit refuses it."""
    monkeypatch.chdir(tmp_path)
    example = str(ROOT / "examples" / "eight_schools.py")
    common = ["--samples", "20", "--diagnostic-particles", "200", "--no-progress", "--out", "run"]
    code, _, err = in_process(capsys, "run", example, "--steps", "4", "--compile", "off", *common)
    assert code == 0, err
    code, out, err = in_process(capsys, "run", example, "--steps", "6", "--resume", *common)
    assert code == 0, err
    assert "resumed from step 4" in out
    code, _, err = in_process(capsys, "run", example, "--steps", "8", "--resume", "--compile", "auto", *common)
    assert code != 0 and "compile=False in the checkpoint" in err, err
