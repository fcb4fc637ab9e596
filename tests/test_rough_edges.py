"""Small things a new user meets: a short ``repr(FitResult)``, loading a finished run, the CLI's
refused resume, the shape message for a missing ``.to_event``, the loss plot's tail."""

from __future__ import annotations

from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoDelta, AutoNormal

import pyro_elbo
from pyro_elbo import IWAE, FitResult


def test_fit_result_repr_is_one_short_line() -> None:
    params = {f"AutoNormal.locs.z{i}": torch.zeros(3) for i in range(10)}
    result = FitResult(history=[float(i) for i in range(10_000)], step_seconds=[0.01] * 10_000, params=params)
    result.objective = IWAE(num_particles=8)
    text = repr(result)
    assert "\n" not in text and len(text) < 300, text
    assert text.startswith("FitResult(10000 steps, final loss 9999, 0 skipped, stop_reason='completed'")
    assert "IWAE(num_particles=8)" in text and "AutoNormal.locs.z0" in text and "(10 in all)" in text
    assert "9998" not in text  # no history dump
    assert repr(FitResult()).startswith("FitResult(0 steps, final loss none")


def _normal_model(y: torch.Tensor) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_load_returns_what_fit_returned_without_training(tmp_path: Path) -> None:
    y = torch.linspace(-1.0, 3.0, 20)
    path = tmp_path / "run.pt"
    pyro.clear_param_store()
    fitted = pyro_elbo.fit(
        _normal_model, AutoNormal(_normal_model), y, num_steps=40, lr=0.05, seed=0, progress=False, checkpoint=path
    )
    pyro.clear_param_store()
    guide = AutoNormal(_normal_model)
    loaded = pyro_elbo.load(path, _normal_model, guide, y, objective=pyro_elbo.ELBO())
    assert loaded.history == fitted.history and loaded.step_seconds == fitted.step_seconds
    assert loaded.params.keys() == fitted.params.keys()
    for name, value in fitted.params.items():
        assert torch.equal(loaded.params[name], value), name
    assert (
        loaded.stop_reason == "loaded" and loaded.num_steps == 40 and repr(loaded.objective) == "ELBO(num_particles=1)"
    )
    assert torch.equal(guide.median()["mu"], fitted.params["AutoNormal.locs.mu"])  # the guide holds the run


def test_load_names_what_does_not_match(tmp_path: Path) -> None:
    y = torch.linspace(-1.0, 3.0, 20)
    path = tmp_path / "run.pt"
    pyro.clear_param_store()
    pyro_elbo.fit(_normal_model, AutoNormal(_normal_model), y, num_steps=5, progress=False, checkpoint=path)
    pyro.clear_param_store()
    with pytest.raises(ValueError, match=r"another model/guide: parameters not in the checkpoint: \['AutoDelta.mu'\]"):
        pyro_elbo.load(path, _normal_model, AutoDelta(_normal_model), y)
    with pytest.raises(ValueError, match=r"trained with ELBO\(num_particles=1\), not IWAE\(num_particles=4\)"):
        pyro_elbo.load(path, _normal_model, AutoNormal(_normal_model), y, objective=pyro_elbo.IWAE(num_particles=4))


def test_cli_refused_resume_is_a_usage_error_with_advice_in_cli_terms(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pyro_elbo import cli

    example = str(Path(__file__).resolve().parents[1] / "examples" / "quickstart.py")
    common = ["run", example, "--steps", "5", "--samples", "10", "--diagnostic-particles", "20", "--out", str(tmp_path)]
    assert cli.main([*common, "--no-progress"]) == 0
    capsys.readouterr()
    assert cli.main([*common, "--no-progress", "--resume", "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "--resume refuses to continue a run with other settings" in err and "lr=0.5 now" in err, err
    assert "--no-resume" in err and "--lr" in err and "resume=False" not in err and "resume=True" not in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert cli.build_parser().parse_args([*common, "--no-resume"]).resume is False


def _model_without_to_event(y: torch.Tensor) -> None:
    z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(z, 1.0), obs=y)  # a vector observation without .to_event(1)


def _vector_guide(y: torch.Tensor) -> None:
    pyro.sample("z", dist.Normal(pyro.param("loc", torch.zeros(3)), 1.0).to_event(1))


@pytest.mark.parametrize("num_particles", [1, 4])
def test_missing_to_event_gets_the_shape_message(num_particles: int) -> None:
    y = torch.zeros(50, 3)
    expected = (
        r"Observed site 'y' inside plate 'data' \(size 50, dim -1\): its distribution has batch shape \(3,\) and "
        r"event shape \(\), observed value of shape \(50, 3\), .*\.to_event\(1\).*batch shape \(\) and event shape \(3,\)"
    )
    pyro.clear_param_store()
    with pytest.raises(ValueError, match=expected):  # fit: parameters are created first
        pyro_elbo.fit(_model_without_to_event, _vector_guide, y, num_steps=1, progress=False)
    pyro.clear_param_store()
    with pytest.raises(ValueError, match=expected):  # an objective in plain Pyro SVI
        pyro_elbo.IWAE(num_particles=num_particles).loss(_model_without_to_event, _vector_guide, y)


def test_loss_plot_shows_the_tail_on_its_own_scale() -> None:
    """A run whose first losses are 1e4 and whose last half still falls from 10.2 to 10.0: the
    whole-run panel is log-scaled, and the tail panel's scale spans the tail only, so its late
    decrease fills the panel instead of being a flat line at the bottom."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = torch.arange(1000, dtype=torch.float64)
    history = (10.0 + 1e4 * torch.exp(-steps / 20) + 0.2 * (1 - steps / 1000)).tolist()
    fig = FitResult(history=history).plot()
    whole, tail = fig.axes
    assert whole.get_yscale() == "log"
    low, high = tail.get_ylim()
    assert 9.9 < low < 10.0 and 10.1 < high < 10.3, (low, high)
    assert tail.get_xlim()[0] >= 450
    plt.close(fig)
    single = FitResult(history=history).plot(tail=0)
    assert len(single.axes) == 1
    plt.close(single)
