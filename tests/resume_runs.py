"""Runs of ``resume_child.py`` in a child process, shared by the resume and preemption tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent


def run_child(tmp_path: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    """``resume_child.py`` writing its checkpoint to ``NAME.pt`` and its result to ``NAME.out``."""
    return subprocess.run(
        [sys.executable, str(HERE / "resume_child.py"), str(tmp_path / f"{name}.pt"), str(tmp_path / f"{name}.out")]
        + list(extra),
        capture_output=True,
        text=True,
        timeout=300,
    )


def straight(tmp_path: Path) -> dict:
    """The result of an uninterrupted run."""
    done = run_child(tmp_path, "straight")
    assert done.returncode == 0, done.stderr
    return torch.load(tmp_path / "straight.out", weights_only=True)


def assert_same_run(a: dict, b: dict) -> None:
    """Bit-identical runs: the same loss history and parameters."""
    assert a["history"] == b["history"]
    for name in a["params"]:
        assert torch.equal(a["params"][name], b["params"][name]), name
