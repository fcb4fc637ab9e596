"""Checkpoints: format 1 files still resume bit-identically, newer formats and incomplete files are
refused by name, and a refused resume (another optimizer, lr or objective) changes nothing: not
the parameters, not the param store, not the random state, not the file. An unwritable location
is found before the first step."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyro
import pytest
import torch
from checkpoint_v1_fixture import guide, model, options

import pyro_elbo
from pyro_elbo.train import init, load_checkpoint

FIXTURE = Path(__file__).parent / "data" / "checkpoint_v1.pt"


def _store() -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in pyro.get_param_store().items()}


def _unchanged(before: dict[str, torch.Tensor]) -> bool:
    after = _store()
    return set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_format_1_checkpoint_resumes_bit_identically(tmp_path: Path) -> None:
    """tests/data/checkpoint_v1.pt was written at step 5 by fit before the package split."""
    straight = pyro_elbo.fit(model, guide, num_steps=10, **options())
    pyro.clear_param_store()
    path = tmp_path / "v1.pt"
    shutil.copy(FIXTURE, path)
    assert torch.load(path, weights_only=True)["format"] == "pyro_elbo.checkpoint/1"
    resumed = pyro_elbo.fit(model, guide, num_steps=10, checkpoint=path, resume=True, **options())
    assert resumed.resumed_from_step == 5
    assert resumed.history == straight.history
    for name, value in straight.params.items():
        assert torch.equal(resumed.params[name], value), name
    assert load_checkpoint(path)["format"] == "pyro_elbo.checkpoint/2"  # rewritten in the new format


def test_newer_or_foreign_formats_are_refused_by_version(tmp_path: Path) -> None:
    state = torch.load(FIXTURE, weights_only=True)
    path = tmp_path / "future.pt"
    torch.save({**state, "format": "pyro_elbo.checkpoint/99"}, path)
    saved = path.read_bytes()
    with pytest.raises(ValueError, match=r"format 'pyro_elbo.checkpoint/99'.*written by a newer pyro_elbo"):
        pyro_elbo.fit(model, guide, num_steps=10, checkpoint=path, resume=True, **options())
    assert path.read_bytes() == saved
    torch.save({"format": "something else"}, path)
    with pytest.raises(ValueError, match="is not a pyro_elbo checkpoint"):
        load_checkpoint(path)


def test_missing_fields_are_named_and_nothing_changes(tmp_path: Path) -> None:
    state = torch.load(FIXTURE, weights_only=True)
    del state["params"]
    del state["optimizer"]["param_groups"]
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    saved = path.read_bytes()
    pyro_elbo.fit(model, guide, num_steps=2, **options())
    before = _store()
    with pytest.raises(ValueError, match=r"lacks the field\(s\) \['params', 'optimizer.param_groups'\]"):
        pyro_elbo.fit(model, guide, num_steps=10, checkpoint=path, resume=True, **options())
    assert _unchanged(before) and path.read_bytes() == saved


def _sgd_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """An SGD run checkpointed at step 5, then trained on to step 8 in memory: the store differs
    from the file, so a resume that wrote anything would show."""
    sgd = dict(options(), optimizer=torch.optim.SGD, optimizer_options={"momentum": 0.9})
    pyro_elbo.fit(model, guide, num_steps=5, checkpoint=path, **sgd)
    pyro_elbo.fit(model, guide, num_steps=3, **sgd)
    return _store()


@pytest.mark.parametrize("version", [1, 2])
def test_sgd_checkpoint_resumed_with_adam_changes_nothing(tmp_path: Path, version: int) -> None:
    path = tmp_path / "sgd.pt"
    before = _sgd_checkpoint(path)
    if version == 1:  # format 1 did not record the optimizer: its options tell
        state = torch.load(path, weights_only=True)
        del state["settings"]
        torch.save({**state, "format": "pyro_elbo.checkpoint/1"}, path)
    saved, rng = path.read_bytes(), torch.get_rng_state()
    match = "optimizer SGD in the checkpoint, Adam now" if version == 2 else r"lacks the option\(s\) \[.*'betas'"
    with pytest.raises(ValueError, match=match):
        pyro_elbo.fit(model, guide, num_steps=10, checkpoint=path, resume=True, **dict(options(), seed=None))
    assert _unchanged(before) and path.read_bytes() == saved
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_resume_that_fails_while_applying_is_undone(tmp_path: Path) -> None:
    """Past every check, a scheduler state that cannot load: parameters, optimizer state and the
    random state are put back as they were."""
    pyro_elbo.fit(model, guide, num_steps=4, checkpoint=tmp_path / "c.pt", **options())
    state = load_checkpoint(tmp_path / "c.pt")
    train_state = init(
        model,
        guide,
        objective=pyro_elbo.IWAE(num_particles=4),
        lr=0.05,
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
        optimizer_options={"foreach": False},
    )
    for _ in range(3):
        train_state, _ = pyro_elbo.train.step(train_state)
    before, rng = _store(), torch.get_rng_state()
    opt_before = {k: v.clone() for k, v in train_state.optimizer.state[train_state.params["loc"]].items()}
    with pytest.raises(TypeError):
        train_state.load_state_dict({**state, "scheduler": 5})
    assert _unchanged(before) and torch.equal(torch.get_rng_state(), rng)
    opt_after = train_state.optimizer.state[train_state.params["loc"]]
    assert all(torch.equal(opt_after[k], v) for k, v in opt_before.items())
    assert train_state.step == 3 and len(train_state.history) == 3


def test_other_lr_objective_or_options_are_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "run.pt"
    pyro_elbo.fit(model, guide, num_steps=5, checkpoint=path, **options())
    saved, before = path.read_bytes(), _store()
    changes = {
        "lr": ({"lr": 0.01}, r"lr=0.05 in the checkpoint, lr=0.01 now"),
        "objective": (
            {"objective": pyro_elbo.ELBO()},
            r"objective IWAE\(num_particles=4\) in the checkpoint, ELBO\(num_particles=1\) now",
        ),
        "betas": (
            {"optimizer_options": {"foreach": False, "betas": (0.5, 0.9)}},
            r"optimizer option betas=\(0.9, 0.999\) in the checkpoint, \(0.5, 0.9\) now",
        ),
        "scheduler": ({"scheduler": None}, "a scheduler in the checkpoint, none now"),
    }
    for name, (change, match) in changes.items():
        with pytest.raises(ValueError, match=match):
            pyro_elbo.fit(model, guide, num_steps=10, checkpoint=path, resume=True, **{**options(), **change})
        assert _unchanged(before) and path.read_bytes() == saved, name
    resumed = pyro_elbo.fit(model, guide, num_steps=10, checkpoint=path, resume=True, **options())
    assert resumed.resumed_from_step == 5 and resumed.num_steps == 10


def test_the_format_1_learning_rate_is_checked_too(tmp_path: Path) -> None:
    path = tmp_path / "v1.pt"
    shutil.copy(FIXTURE, path)
    with pytest.raises(ValueError, match=r"lr=0.05 in the checkpoint, lr=0.1 now"):
        pyro_elbo.fit(model, guide, num_steps=10, checkpoint=path, resume=True, **{**options(), "lr": 0.1})


def test_unwritable_checkpoint_location_fails_before_the_first_step(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    steps = []
    for target, match in ((blocker / "ckpt.pt", "cannot be written"), (tmp_path, "is a folder")):
        with pytest.raises(ValueError, match=match):
            pyro_elbo.fit(
                model,
                guide,
                num_steps=5,
                checkpoint=target,
                progress=False,
                callbacks=[lambda step, loss: steps.append(step)],
            )
    assert steps == [] and blocker.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # no probe file left behind


def test_incomplete_settings_in_a_format_2_file_are_named(tmp_path: Path) -> None:
    path = tmp_path / "run.pt"
    pyro_elbo.fit(model, guide, num_steps=2, checkpoint=path, **options())
    state = torch.load(path, weights_only=True)
    del state["settings"]["lr"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"lacks the field\(s\) \['settings.lr'\]"):
        load_checkpoint(path)


def test_a_changed_constraint_or_compile_setting_is_refused_by_name(tmp_path: Path) -> None:
    """A constraint maps the saved unconstrained value to another value (positive -> interval(0, 10)
    turned the saved scale 0.82 into 4.50); a changed ``compile`` diverges from the resumed step."""
    import pyro.distributions as dist

    def bounded_guide() -> None:
        loc = pyro.param("loc", torch.tensor(0.0, dtype=torch.float64))
        scale = pyro.param("scale", torch.tensor(1.0, dtype=torch.float64), constraint=dist.constraints.interval(0, 10))
        pyro.sample("z", dist.Normal(loc, scale))

    path = tmp_path / "run.pt"
    pyro_elbo.fit(model, guide, num_steps=5, checkpoint=path, **options())
    saved = path.read_bytes()
    pyro.clear_param_store()
    with pytest.raises(
        ValueError,
        match=r"parameter 'scale' has constraint GreaterThan\(lower_bound=0.0\) in the checkpoint, "
        r"Interval\(lower_bound=0, upper_bound=10\) now",
    ):
        pyro_elbo.fit(model, bounded_guide, num_steps=10, checkpoint=path, resume=True, **options())
    pyro.clear_param_store()
    with pytest.raises(ValueError, match=r"compile=False in the checkpoint, compile=True now"):
        pyro_elbo.fit(model, guide, num_steps=10, checkpoint=path, resume=True, compile=True, **options())
    assert path.read_bytes() == saved
    pyro.clear_param_store()
    resumed = pyro_elbo.fit(model, guide, num_steps=10, checkpoint=path, resume=True, **options())
    assert resumed.resumed_from_step == 5
