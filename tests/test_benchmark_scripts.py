"""The speed benchmark and the GPU check run as scripts: without CUDA they refuse clearly, and
the benchmark's CPU path runs end to end at tiny sizes (slow: it compiles three models)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_check_refuses_without_cuda(tmp_path: Path) -> None:
    report = tmp_path / "gpu.md"
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        env={**ENV, "GPU_REPORT": str(report), "PYTHON": sys.executable},
        timeout=120,
    )
    assert done.returncode == 2 and "no CUDA device" in done.stderr
    assert not report.exists()  # nothing was run or written


@pytest.mark.slow  # ~20 s: the script imports Pyro, the examples and the package first
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_speed_refuses_cuda_without_cuda() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--device", "cuda", "--tables", ""],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert done.returncode != 0 and "CUDA is not available" in done.stderr


@pytest.mark.slow
def test_speed_runs_on_cpu_at_tiny_sizes() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--tiny", "--tables", "abk", "--vae-batch", "8",
         "--vae-k", "2", "--vae-objectives", "iwae"],
        capture_output=True, text=True, env=ENV, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    for needle in ("| eight schools |", "| logistic regression |", "| iwae | 2 | 8 |", "largest K at batch 8"):
        assert needle in done.stdout
