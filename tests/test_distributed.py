"""Data-parallel fit with torch.distributed: 2 processes (Gloo, CPU) started by torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pyro_elbo.distributed import Context

CHILD = Path(__file__).parent / "distributed_child.py"


def launch(nproc: int, out: Path, *args: str) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
    env["OMP_NUM_THREADS"] = "1"
    command = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(CHILD),
            str(out),
            *args,
        ]
        if nproc > 1
        else [sys.executable, str(CHILD), str(out), *args]
    )
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def map_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    single = launch(1, root / "single", "--batch", "16")
    assert single.returncode == 0, single.stderr
    double = launch(2, root / "double", "--batch", "8", "--checkpoint", str(root / "double" / "ckpt.pt"))
    assert double.returncode == 0, double.stderr
    return {"single": root / "single", "double": root / "double", "root": root}


def test_two_processes_follow_one_process_with_the_combined_batch(map_runs: dict[str, Path]) -> None:
    """MAP (AutoDelta) has deterministic gradients: 2 x batch 8 == 1 x batch 16 to float tolerance."""
    one = load(map_runs["single"] / "rank0.pt")
    two = [load(map_runs["double"] / f"rank{r}.pt") for r in (0, 1)]
    assert len(one["history"]) == len(two[0]["history"]) == 40
    for name, value in one["params"].items():
        assert torch.allclose(two[0]["params"][name], value, rtol=1e-9, atol=1e-12), name
        assert torch.equal(two[0]["params"][name], two[1]["params"][name]), name
    assert two[0]["history"] == pytest.approx(one["history"], rel=1e-9)
    assert two[0]["history"] == two[1]["history"]  # the averaged loss is reported on every rank


def test_only_rank_0_writes_the_checkpoint(map_runs: dict[str, Path]) -> None:
    assert (map_runs["double"] / "wrote_checkpoint_rank0").exists()
    assert not (map_runs["double"] / "wrote_checkpoint_rank1").exists()
    assert (map_runs["double"] / "ckpt.pt").exists()


def test_ranks_draw_different_reproducible_particles_and_resume(map_runs: dict[str, Path]) -> None:
    root = map_runs["root"]
    iwae = ["--batch", "8", "--objective", "stochastic"]
    first = launch(2, root / "iwae_a", *iwae, "--epochs", "6")
    again = launch(2, root / "iwae_b", *iwae, "--epochs", "6")
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    a = [load(root / "iwae_a" / f"rank{r}.pt") for r in (0, 1)]
    b = [load(root / "iwae_b" / f"rank{r}.pt") for r in (0, 1)]
    assert not torch.equal(a[0]["draws"][0], a[1]["draws"][0])  # each rank its own stream
    assert torch.equal(a[0]["draws"][0], b[0]["draws"][0]) and torch.equal(a[1]["draws"][0], b[1]["draws"][0])
    for name in a[0]["params"]:  # gradients averaged: every rank holds the same parameters
        assert torch.equal(a[0]["params"][name], a[1]["params"][name])
        assert torch.equal(a[0]["params"][name], b[0]["params"][name])
    # resume: 3 epochs, then 3 more from the checkpoint == 6 straight
    checkpoint = ["--checkpoint", str(root / "iwae_c" / "ckpt.pt")]
    part = launch(2, root / "iwae_c", *iwae, "--epochs", "3", *checkpoint)
    assert part.returncode == 0, part.stderr
    rest = launch(2, root / "iwae_c", *iwae, "--epochs", "6", *checkpoint, "--resume")
    assert rest.returncode == 0, rest.stderr
    c = load(root / "iwae_c" / "rank0.pt")
    assert c["history"] == a[0]["history"]
    for name in a[0]["params"]:
        assert torch.equal(c["params"][name], a[0]["params"][name]), name
    # a different world size refuses to resume
    wrong = launch(1, root / "iwae_c", *iwae, "--epochs", "8", *checkpoint, "--resume")
    assert wrong.returncode != 0 and "world size" in wrong.stderr


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(range(4))


def test_loaders_that_cannot_be_sharded_are_refused() -> None:
    from pyro_elbo import distributed

    ctx = distributed.Context(active=True, rank=0, world_size=2)
    with pytest.raises(ValueError, match="IterableDataset cannot be sharded"):
        distributed.shard_loader(torch.utils.data.DataLoader(Stream(), batch_size=2), ctx)
    dataset = torch.utils.data.TensorDataset(torch.arange(8))
    sampler = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(dataset), 2, False)
    with pytest.raises(ValueError, match="custom batch_sampler cannot be sharded"):
        distributed.shard_loader(torch.utils.data.DataLoader(dataset, batch_sampler=sampler), ctx)


def test_sigterm_to_torchrun_loses_no_step_and_resume_is_bit_identical(tmp_path: Path) -> None:
    """The launcher forwards SIGTERM to both ranks; they stop after the same step, rank 0 writes
    the checkpoint there, and the resumed run is the uninterrupted one."""
    iwae = ["--batch", "8", "--objective", "stochastic", "--epochs", "20"]
    straight = launch(2, tmp_path / "straight", *iwae)
    assert straight.returncode == 0, straight.stderr
    checkpoint = ["--checkpoint", str(tmp_path / "run" / "ckpt.pt")]
    stopped = launch(2, tmp_path / "run", *iwae, *checkpoint, "--sigterm-launcher-at", "5", "--pace", "0.2")
    assert stopped.returncode != 0
    assert "fit: stopped by SIGTERM after step" in stopped.stderr
    taken = [(tmp_path / "run" / f"steps{r}.txt").read_text().split() for r in (0, 1)]
    assert taken[0] == taken[1]  # the ranks agreed on the step to stop at
    held = checkpoint_step(tmp_path / "run" / "ckpt.pt")
    assert held == int(taken[0][-1]) >= 5
    resumed = launch(2, tmp_path / "run", *iwae, *checkpoint, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = load(tmp_path / "straight" / "rank0.pt"), load(tmp_path / "run" / "rank0.pt")
    assert a["history"] == b["history"]
    for name in a["params"]:
        assert torch.equal(a["params"][name], b["params"][name]), name


def checkpoint_step(path: Path) -> int:
    from pyro_elbo.train import load_checkpoint

    return int(load_checkpoint(path)["step"])


def test_parameters_that_differ_across_ranks_are_refused_by_name(tmp_path: Path) -> None:
    """The first all-reduce used to abort rank 0 (collective mismatch); now every rank refuses at start."""
    result = launch(2, tmp_path, "--batch", "8", "--local-param")
    assert result.returncode != 0
    assert "parameter 'local_w' has shape (3,) (float64) on rank 0 but (4,) (float64) on rank 1" in result.stderr
    assert "SIGABRT" not in result.stderr and "collective" not in result.stderr.lower()


def test_ranks_with_different_amounts_of_data_agree_on_the_shortest_epoch(tmp_path: Path) -> None:
    """Rank 0's shard has 3 batches, rank 1's 4: both take 3 per epoch (this used to hang)."""
    result = launch(2, tmp_path, "--batch", "4", "--rows-by-rank", "24,32", "--epochs", "2")
    assert result.returncode == 0, result.stderr
    assert "different numbers of batches per epoch (rank 0: 3, rank 1: 4); every rank takes 3" in result.stderr
    runs = [load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert len(runs[0]["history"]) == len(runs[1]["history"]) == 6


def test_a_per_rank_stream_trains_with_num_steps(tmp_path: Path) -> None:
    result = launch(2, tmp_path, "--batch", "4", "--stream", "10")
    assert result.returncode == 0, result.stderr
    runs = [load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert len(runs[0]["history"]) == 10 and runs[0]["history"] == runs[1]["history"]
    from pyro_elbo.train.data import Data

    ctx = Context(active=True, rank=0, world_size=2)
    stream = torch.utils.data.DataLoader(Stream(), batch_size=2)
    for steps, epochs in ((None, None), (10, 2)):  # a stream is refused only without num_steps (or with epochs)
        with pytest.raises(ValueError, match=r"yield this rank's part .* pass num_steps=N without num_epochs"):
            Data((stream,), steps, epochs, None, ctx)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="sets threads' CPU and class through Linux's /proc")
def test_a_finished_run_exits_0_on_every_rank_while_gloo_workers_still_hold_tensors(tmp_path: Path) -> None:
    """Gloo's worker threads release a collective's tensors a moment after the caller has moved on
    (the barrier that ends ``fit`` holds the last all-reduce); when the caller's Python object of
    such a tensor is gone, that release takes the GIL. A worker that got there only while the
    interpreter finalized was ended by CPython inside the tensor's destructor, and the rank aborted
    after a finished run ("terminate called without an active exception", exit -6). Here the
    workers run only when their CPU is otherwise idle, so they release late. While the group
    outlived ``destroy_process_group`` (``torch.distributed.nn.functional``, imported after
    ``init_process_group``, held it in default arguments), most such runs aborted; the group must be
    gone, its threads joined, before the interpreter finalizes."""
    result = launch(2, tmp_path, "--batch", "4", "--stream", "10", "--starve-gloo-workers", "--exit-check")
    assert result.returncode == 0, result.stderr
    assert "terminate called" not in result.stderr
    for rank in (0, 1):
        alive = (tmp_path / f"threads{rank}.txt").read_text().split()
        assert [name for name in alive if "gloo" in name] == [], alive


OWN_GROUP = """
import pathlib, sys
import pyro, pyro.distributions as dist, torch
import pyro_elbo
torch.distributed.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)

def model(x):
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

pyro_elbo.fit(model, pyro.infer.autoguide.AutoDelta(model), torch.randn(8), num_steps=2, progress=False)
torch.distributed.destroy_process_group()
print(sorted((task / "comm").read_text().strip() for task in pathlib.Path("/proc/self/task").iterdir()))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists a process's threads through Linux's /proc")
def test_a_group_the_program_created_is_freed_by_its_own_destroy_process_group_after_fit(tmp_path: Path) -> None:
    """fit builds an optimizer, which imports ``torch.distributed.nn.functional`` (through
    ``torch._dynamo``); imported after the program's ``init_process_group``, its default arguments
    kept the group, and the program's ``destroy_process_group`` left Gloo's threads running into the
    interpreter's teardown (the abort above). Importing the package first binds them to ``None``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", OWN_GROUP, str(tmp_path / "store")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "gloo" not in result.stdout, result.stdout


@pytest.mark.slow  # (a rank stalled for a minute)
def test_a_stalled_rank_fails_after_the_process_group_timeout(tmp_path: Path) -> None:
    start = time.monotonic()
    result = launch(2, tmp_path, "--batch", "8", "--stall-at", "3", "--timeout", "5")
    assert result.returncode != 0
    assert time.monotonic() - start < 100  # torch's default would wait 30 minutes
