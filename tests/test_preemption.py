"""SIGTERM (preemption) and SIGINT (Ctrl-C) during fit: the step in progress finishes, the
checkpoint is written at it, one line says how to resume, the status is the conventional one, and
the resumed run is bit-identical to an uninterrupted one. Also the checkpoint path's lock."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_elbo
from pyro_elbo import train
from pyro_elbo.train.lock import CheckpointLock, CheckpointLocked

from resume_runs import assert_same_run, run_child, straight

HERE = Path(__file__).parent
ROOT = HERE.parent


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return straight(tmp_path_factory.mktemp("straight"))


@pytest.mark.parametrize(
    ("name", "status"), [("TERM", 143), pytest.param("INT", -signal.SIGINT, marks=pytest.mark.slow)]
)
def test_a_signal_saves_the_step_reached_and_resume_is_bit_identical(
    tmp_path: Path, name: str, status: int, straight_run: dict
) -> None:
    """Checkpoints every 5 steps; the signal at step 7 used to lose steps 6 and 7."""
    stopped = run_child(tmp_path, "run", "--signal-at", "7", "--signal", name)
    assert stopped.returncode == status, stopped.stderr
    assert train.load_checkpoint(tmp_path / "run.pt")["step"] == 7
    line = f"fit: stopped by SIG{name} after step 7 of 25; checkpoint {tmp_path / 'run.pt'} written at step 7"
    assert line in stopped.stderr
    assert stopped.stderr.count("Traceback") == (1 if name == "INT" else 0)
    assert stopped.stderr.count('File "') <= 4 and "torch" not in stopped.stderr  # no traceback through torch
    assert not (tmp_path / "run.pt.lock").exists()
    resumed = run_child(tmp_path, "run", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(straight_run, torch.load(tmp_path / "run.out", weights_only=True))


@pytest.mark.slow  # (a child process for tens of seconds)
def test_sigterm_from_outside_loses_no_step(tmp_path: Path, straight_run: dict) -> None:
    """A scheduler's SIGTERM at an arbitrary moment: the checkpoint holds every step taken."""
    trace = tmp_path / "trace.txt"
    child = subprocess.Popen(
        [sys.executable, str(HERE / "resume_child.py"), str(tmp_path / "run.pt"), str(tmp_path / "run.out")]
        + ["--pace", "0.05", "--trace", str(trace)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (trace.exists() and len(trace.read_text().split()) >= 8) and time.monotonic() < deadline:
            time.sleep(0.01)
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 143, stderr
    reached = max(int(s) for s in trace.read_text().split())
    assert train.load_checkpoint(tmp_path / "run.pt")["step"] == reached
    resumed = run_child(tmp_path, "run", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(straight_run, torch.load(tmp_path / "run.out", weights_only=True))


def _model(x: torch.Tensor) -> None:
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(loc, 1.0), obs=x)


def _guide(x: torch.Tensor) -> None:
    a = pyro.param("a", torch.tensor(0.0))
    s = pyro.param("s", torch.tensor(1.0), constraint=dist.constraints.positive)
    pyro.sample("loc", dist.Normal(a, s))


def test_ctrl_c_in_the_api_saves_raises_keyboard_interrupt_and_restores_handlers(tmp_path: Path) -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def ctrl_c(step: int, loss: float) -> None:
        if step == 12:
            os.kill(os.getpid(), signal.SIGINT)

    path = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt, match=r"stopped by SIGINT after step 12 of 40; checkpoint .* at step 12"):
        pyro_elbo.fit(
            _model, _guide, torch.randn(6), num_steps=40, checkpoint=path, checkpoint_every=10,
            callbacks=[ctrl_c], progress=False,
        )  # fmt: skip
    assert train.load_checkpoint(path)["step"] == 12
    assert {sig: signal.getsignal(sig) for sig in before} == before
    pyro.clear_param_store()
    result = pyro_elbo.fit(
        _model, _guide, torch.randn(6), num_steps=40, checkpoint=path, checkpoint_every=10, resume=True,
        progress=False,
    )  # fmt: skip
    assert result.resumed_from_step == 12 and result.num_steps == 40
    assert {sig: signal.getsignal(sig) for sig in before} == before


@pytest.mark.slow  # (a child process for tens of seconds)
def test_cli_sigterm_keeps_the_step_reached_and_says_so(tmp_path: Path) -> None:
    """The progress bar's last count is the step reached; the checkpoint must hold it (it used to
    hold the last multiple of --steps/20)."""
    child = subprocess.Popen(
        [sys.executable, "-m", "pyro_elbo.cli", "run", str(ROOT / "examples" / "eight_schools.py")]
        + ["--steps", "20000", "--out", "out", "--samples", "10"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "out" / "checkpoint.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 143, stderr
    held = train.load_checkpoint(tmp_path / "out" / "checkpoint.pt")["step"]
    reached = int(stderr.replace("\r", "\n").split("/20000")[-2].split()[-1])
    assert held == reached > 1000
    assert f"pyro-elbo: stopped by SIGTERM; out/checkpoint.pt holds step {held} of 20000; rerun with --resume" in stderr
    assert not list((tmp_path / "out").glob(".checkpoint.pt.*"))
    assert not (tmp_path / "out" / "checkpoint.pt.lock").exists()


def test_cli_says_when_no_checkpoint_was_written(tmp_path: Path) -> None:
    from pyro_elbo import cli

    args = cli.build_parser().parse_args(["run", "model.py", "--out", str(tmp_path / "out"), "--steps", "50"])
    assert "no checkpoint was written" in cli._checkpoint_left(args)
    assert "kept" not in cli._checkpoint_left(args)


def test_a_second_writer_is_refused_and_a_stale_lock_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "run.pt"
    tmp = tmp_path / ".run.pt.abcd1234.tmp"  # an interrupted write's leftover
    tmp.write_bytes(b"partial")
    with CheckpointLock(path):
        assert not tmp.exists()
        assert (tmp_path / "run.pt.lock").read_text() == f"pid {os.getpid()} on host {socket.gethostname()}"
        with pytest.raises(CheckpointLocked, match=rf"being written by another run \(pid {os.getpid()} on host"):
            pyro_elbo.fit(_model, _guide, torch.randn(6), num_steps=3, checkpoint=path, progress=False)
        with pytest.raises(CheckpointLocked, match="pass another checkpoint path"):
            pyro_elbo.fit(_model, _guide, torch.randn(6), num_steps=3, checkpoint=path, resume=True, progress=False)
    assert not (tmp_path / "run.pt.lock").exists()
    # a process that died holding the lock (kill -9) leaves the file but not the flock
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "run.pt.lock").write_text(f"pid {dead.stdout.strip()} on host {socket.gethostname()}")
    with pytest.warns(
        RuntimeWarning, match=rf"left by a process that is no longer running \(pid {dead.stdout.strip()}"
    ):
        pyro_elbo.fit(_model, _guide, torch.randn(6), num_steps=3, checkpoint=path, progress=False)
    assert not (tmp_path / "run.pt.lock").exists()


@pytest.mark.slow  # (a child process for tens of seconds)
def test_two_live_processes_on_one_checkpoint_path(tmp_path: Path) -> None:
    first = subprocess.Popen(
        [sys.executable, str(HERE / "resume_child.py"), str(tmp_path / "run.pt"), str(tmp_path / "a.out")]
        + ["--pace", "5", "--trace", str(tmp_path / "trace.txt")],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "trace.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        second = run_child(tmp_path, "run", "--resume")
        assert second.returncode == 1
        assert f"is being written by another run (pid {first.pid} on host" in second.stderr
    finally:
        first.kill()
        first.wait(timeout=60)


def test_a_resume_says_so_in_the_progress_bar_and_the_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "run.pt"
    pyro_elbo.fit(_model, _guide, torch.randn(6), num_steps=5, checkpoint=path, progress=False)
    pyro_elbo.fit(_model, _guide, torch.randn(6), num_steps=8, checkpoint=path, resume=True, progress=True)
    assert "resumed from step 5" in capsys.readouterr().out  # (written above the bar)
    with caplog.at_level("INFO", logger="pyro_elbo.train"):
        pyro_elbo.fit(_model, _guide, torch.randn(6), num_steps=9, checkpoint=path, resume=True, progress=False)
    assert f"resumed from step 8 of {path}" in caplog.text


def test_the_programs_own_sigterm_handler_runs_after_the_checkpoint(tmp_path: Path) -> None:
    """A handler installed before fit (e.g. one that requeues a Slurm job) still runs, once, after
    the checkpoint holds the step reached; then fit raises TrainingTerminated and the handler is back."""
    path = tmp_path / "run.pt"
    calls: list[tuple[int, int]] = []

    def requeue(signum: int, frame: object) -> None:
        calls.append((signum, train.load_checkpoint(path)["step"]))

    def preempt(step: int, loss: float) -> None:
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, requeue)
    try:
        with pytest.raises(train.TrainingTerminated) as stopped:
            pyro_elbo.fit(
                _model, _guide, torch.randn(6), num_steps=20, checkpoint=path, callbacks=[preempt], progress=False
            )
        assert stopped.value.code == 143 and stopped.value.step == 4
        assert calls == [(signal.SIGTERM, 4)]
        assert signal.getsignal(signal.SIGTERM) is requeue
    finally:
        signal.signal(signal.SIGTERM, previous)
