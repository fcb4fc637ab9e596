"""fit(): convergence, minibatches, kill -9 and resume, non-finite steps, checkpoints, seeds,
memory, callbacks, early stopping, validation, devices."""

from __future__ import annotations

import gc
import math
import warnings
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoDelta

import pyro_elbo
from pyro_elbo import train

from models import default_conjugate, relative_tolerance
from resume_runs import assert_same_run, run_child, straight

HERE = Path(__file__).parent


def test_fit_converges_to_the_closed_form_posterior() -> None:
    c = default_conjugate()
    result = pyro_elbo.fit(
        c.model,
        c.guide_at(0.0, 1.0),
        4,
        objective=pyro_elbo.STL(),
        num_steps=1500,
        lr=0.05,
        progress=False,
        scheduler=lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, 0.998),
    )
    # STL's gradient vanishes at the optimum: the iterates settle on the exact posterior
    assert torch.allclose(result.params["loc"], torch.full((4,), c.post_loc), atol=1e-3)
    assert torch.allclose(result.params["scale"], torch.full((4,), c.post_scale), atol=1e-3)
    assert len(result.history) == len(result.step_seconds) == 1500
    assert result.num_skipped == 0 and result.stop_reason == "completed"
    assert result.history[-1] == pytest.approx(-c.log_evidence * 4, abs=1e-6)


N = 12


def sub_model(idx, x):
    loc = pyro.param("prior_loc", torch.tensor(0.3))
    with pyro.plate("data", N, subsample=idx):
        pyro.sample("x", dist.Normal(loc, 1.0), obs=x)


def sub_guide(idx, x):
    pass


def test_minibatch_gradients_average_to_the_full_batch_gradient() -> None:
    """The plate's N/B scale makes the mean of an epoch's minibatch gradients equal the full one."""
    data = torch.linspace(-1, 2, N)
    objective = pyro_elbo.ELBO()
    pyro.get_param_store().clear()
    objective.loss_and_grads(sub_model, sub_guide, torch.arange(N), data)
    full = pyro.get_param_store()["prior_loc"].grad.clone()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(N), data), batch_size=4)
    grads = []
    for idx, x in loader:
        pyro.get_param_store()["prior_loc"].grad = None
        objective.loss_and_grads(sub_model, sub_guide, idx, x)
        grads.append(pyro.get_param_store()["prior_loc"].grad.clone())
    assert torch.allclose(torch.stack(grads).mean(0), full, rtol=relative_tolerance(), atol=1e-12)
    result = pyro_elbo.fit(sub_model, sub_guide, loader, num_epochs=3, progress=False)
    assert result.num_steps == 3 * len(loader)
    # num_steps caps num_epochs when both are given; alone, it may end mid-epoch
    assert pyro_elbo.fit(sub_model, sub_guide, loader, num_epochs=3, num_steps=5, progress=False).num_steps == 5
    assert (
        pyro_elbo.fit(sub_model, sub_guide, loader, num_steps=len(loader) + 1, progress=False).num_steps
        == len(loader) + 1
    )


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return straight(tmp_path_factory.mktemp("straight"))


@pytest.mark.parametrize(
    "kill",
    [("--kill-at", "7"), ("--kill-at", "10"), ("--kill-in-write", "15")],
    ids=["mid-interval", "after-save", "during-write"],
)
def test_kill_9_then_resume_is_bit_identical(tmp_path: Path, kill: tuple[str, str], straight_run: dict) -> None:
    killed = run_child(tmp_path, "run", *kill)
    assert killed.returncode == -9, killed.stderr
    if kill[0] == "--kill-in-write":  # the previous checkpoint survived the interrupted write
        assert train.load_checkpoint(tmp_path / "run.pt")["step"] == 10
        assert len(list(tmp_path.glob(".run.pt.*.tmp"))) == 1
    resumed = run_child(tmp_path, "run", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "left by a process that is no longer running" in resumed.stderr  # its lock, taken over
    assert not list(tmp_path.glob(".run.pt.*.tmp"))  # the interrupted write's file, removed
    assert_same_run(straight_run, torch.load(tmp_path / "run.out", weights_only=True))


def test_nan_in_data_names_the_observed_site_and_leaves_parameters_untouched() -> None:
    c = default_conjugate()
    c.x = c.x.clone()
    c.x[2] = math.nan
    guide = c.guide_at(0.1, 0.9)
    pyro_elbo.fit(c.model, guide, 1, num_steps=0, progress=False)  # create the parameters
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    with pytest.raises(ValueError, match="observed site 'x'"):
        pyro_elbo.fit(c.model, guide, 1, num_steps=5, progress=False)
    with pyro.validation_enabled(False), pytest.raises(pyro_elbo.NonFiniteLossError, match="model site 'x'"):
        pyro_elbo.fit(c.model, guide, 1, num_steps=5, progress=False)
    for k, v in pyro.get_param_store().items():
        assert torch.equal(v.detach(), before[k]), k


def test_transient_nan_is_skipped_and_counted() -> None:
    c = default_conjugate()
    calls = {"n": 0}

    def flaky_model(replicates):
        calls["n"] += 1
        scale = math.nan if calls["n"] in (4, 5) else 1.0
        with pyro.plate("rep", replicates, dim=-1):
            z = pyro.sample("z", dist.Normal(c.mu0, c.s0))
            with pyro.plate("obs", c.n, dim=-2):
                pyro.sample("x", dist.Normal(z, c.sigma * scale), obs=c.x.unsqueeze(-1))

    guide = c.guide_at(0.0, 1.0)
    snapshots = []

    def watch(step, loss):
        snapshots.append((step, loss, pyro.get_param_store()["loc"].detach().clone()))

    with pyro.validation_enabled(False):
        result = pyro_elbo.fit(
            flaky_model, guide, 1, num_steps=8, on_nonfinite="skip", progress=False, callbacks=[watch]
        )
    assert result.num_skipped == 2
    bad = [i for i, loss in enumerate(result.history) if math.isnan(loss)]
    assert len(bad) == 2 and bad[1] == bad[0] + 1 and bad[0] >= 1
    k = bad[0]
    # skipped steps leave the parameters bit-identical; the next good step moves them
    assert torch.equal(snapshots[k - 1][2], snapshots[k][2]) and torch.equal(snapshots[k][2], snapshots[k + 1][2])
    assert not torch.equal(snapshots[k + 1][2], snapshots[k + 2][2])
    with pyro.validation_enabled(False), pytest.raises(pyro_elbo.NonFiniteLossError, match="2 consecutive"):
        calls["n"] = 0
        pyro_elbo.fit(flaky_model, guide, 1, num_steps=8, on_nonfinite="skip", max_consecutive_skips=2, progress=False)


def test_corrupt_or_mismatched_checkpoints_are_refused_and_left_alone(tmp_path: Path) -> None:
    c = default_conjugate()
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        pyro_elbo.fit(c.model, c.guide_at(0.0, 1.0), 1, num_steps=3, checkpoint=path, resume=True, progress=False)
    assert path.read_bytes() == b"not a checkpoint at all"

    pyro_elbo.fit(c.model, c.guide_at(0.0, 1.0), 2, num_steps=3, checkpoint=path, progress=False)
    saved = path.read_bytes()
    pyro.clear_param_store()
    with pytest.raises(ValueError, match=r"different model/guide: shapes differ for \['loc', 'scale'\]"):
        pyro_elbo.fit(c.model, c.guide_at(0.0, 1.0), 3, num_steps=6, checkpoint=path, resume=True, progress=False)
    pyro.clear_param_store()

    def other_guide(replicates):
        with pyro.plate("rep", replicates):
            pyro.sample("z", dist.Normal(pyro.param("m", torch.zeros(replicates)), 1.0))

    with pytest.raises(ValueError, match=r"parameters not in the checkpoint: \['m'\]"):
        pyro_elbo.fit(c.model, other_guide, 2, num_steps=6, checkpoint=path, resume=True, progress=False)
    assert path.read_bytes() == saved


def test_same_seed_gives_identical_runs() -> None:
    c = default_conjugate()

    def run(seed: int) -> pyro_elbo.FitResult:
        pyro.clear_param_store()
        objective = pyro_elbo.IWAE(num_particles=4)
        return pyro_elbo.fit(
            c.model, c.guide_at(0.0, 1.0), 3, objective=objective, num_steps=50, seed=seed, progress=False
        )

    runs = [run(7), run(7)]
    assert runs[0].history == runs[1].history
    assert all(torch.equal(runs[0].params[k], runs[1].params[k]) for k in runs[0].params)
    assert run(8).history != runs[0].history


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() pokes deprecated torch objects
        warnings.simplefilter("ignore")
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def test_no_growth_of_live_tensors_over_3000_steps() -> None:
    c = default_conjugate()
    counts = {}

    def count(step, loss):
        if step in (100, 3000):
            counts[step] = _live_tensors()

    pyro_elbo.fit(
        c.model,
        c.guide_at(0.0, 1.0),
        2,
        objective=pyro_elbo.DReG(num_particles=4),
        num_steps=3000,
        progress=False,
        callbacks=[count],
    )
    assert counts[3000] <= counts[100], counts


def test_callbacks_early_stopping_validation_and_progress(capsys: pytest.CaptureFixture[str]) -> None:
    c = default_conjugate()
    result = pyro_elbo.fit(
        c.model, c.guide_at(0.0, 1.0), 1, num_steps=500, progress=False, callbacks=[lambda step, loss: step < 20]
    )
    assert result.stop_reason == "callback" and result.num_steps == 20
    pyro.clear_param_store()
    result = pyro_elbo.fit(
        c.model,
        c.guide_at(c.post_loc, c.post_scale),
        1,
        objective=pyro_elbo.STL(),
        num_steps=5000,
        patience=50,
        min_delta=1e-6,
        progress=False,
        validation=(1,),
        validate_every=10,
    )
    assert result.stop_reason == "early_stopping" and result.num_steps < 5000
    assert result.validation_history[0][0] == 10
    assert result.validation_history[0][1] == pytest.approx(-c.log_evidence, abs=0.05)  # near the optimum
    pyro.clear_param_store()
    pyro_elbo.fit(c.model, c.guide_at(0.0, 1.0), 1, num_steps=30, progress=True, clip_norm=1.0)
    err = capsys.readouterr().err
    assert "30/30" in err and "step/s" in err and "loss=" in err


def test_map_with_autodelta_and_a_dataloader_matches_full_batch() -> None:
    data = torch.linspace(-1, 2, N)

    def model(idx, x):
        loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
        with pyro.plate("data", N, subsample=idx):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    guide = AutoDelta(model)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(N), data), batch_size=N)
    result = pyro_elbo.fit(model, guide, loader, num_epochs=400, lr=0.05, progress=False)
    exact = float(data.sum() / (N + 0.01))
    assert float(result.params["AutoDelta.loc"]) == pytest.approx(exact, abs=1e-3)


def test_bad_options_and_mixed_devices() -> None:
    c = default_conjugate()
    with pytest.raises(ValueError, match="on_nonfinite"):
        pyro_elbo.fit(c.model, c.guide_at(0.0, 1.0), 1, on_nonfinite="ignore")
    with pytest.raises(TypeError, match="pyro_elbo objective"):
        pyro_elbo.fit(c.model, c.guide_at(0.0, 1.0), 1, objective=pyro.infer.Trace_ELBO())
    with pytest.raises(ValueError, match="num_epochs needs a DataLoader"):
        pyro_elbo.fit(c.model, c.guide_at(0.0, 1.0), 1, num_epochs=2)
    params = {"loc": torch.zeros(2, device="meta")}
    with pytest.raises(ValueError, match=r"data argument 0 is on cpu but parameter 'loc' on meta"):
        train.loop.check_devices(params, (torch.zeros(2),), None)
    with pytest.raises(ValueError, match=r"parameter 'loc' is on meta but device=cpu"):
        train.loop.check_devices(params, (), torch.device("cpu"))


def test_explicit_cpu_device_moves_and_trains() -> None:
    c = default_conjugate()
    result = pyro_elbo.fit(c.model, c.guide_at(0.0, 1.0), 2, num_steps=20, device="cpu", progress=False)
    assert all(v.device.type == "cpu" for v in result.params.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fit_and_checkpoint_loads_on_cpu(tmp_path: Path) -> None:
    c = default_conjugate()
    c.x = c.x.cuda()
    result = pyro_elbo.fit(
        c.model, c.guide_at(0.0, 1.0), 2, num_steps=20, device="cuda", checkpoint=tmp_path / "c.pt", progress=False
    )
    assert all(v.device.type == "cuda" for v in result.params.values())
    state = pyro_elbo.load_checkpoint(tmp_path / "c.pt", map_location="cpu")
    assert all(t.device.type == "cpu" for t in state["params"].values())
