"""What :func:`~pyro_elbo.train.fit` returns, and the error of a refused step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from pyro_elbo.objectives import Objective


class NonFiniteLossError(FloatingPointError):
    """A step produced a NaN/inf loss or gradient; parameters were left as they were."""


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        history: the loss of every step taken (skipped steps included, as NaN/inf).
        step_seconds: wall-clock seconds of every step (see :attr:`~pyro_elbo.train.StepInfo.seconds`).
        num_skipped: steps skipped as non-finite (``on_nonfinite="skip"``).
        validation_history: ``(step, loss)`` every ``validate_every`` steps.
        stop_reason: ``"completed"``, ``"early_stopping"``, ``"callback"`` or the name a hook gave.
        params: parameter name -> constrained value (detached) at the end.
        objective: the objective used.
        resumed_from_step: the checkpoint's step when the run resumed from one.
        compile_seconds: capture and compilation time of the compiled step (``compile=True``).
        compile_decision: with ``compile="auto"``, which path ran and why (one line).
    """

    history: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    num_skipped: int = 0
    validation_history: list[tuple[int, float]] = field(default_factory=list)
    stop_reason: str = "completed"
    params: dict[str, Tensor] = field(default_factory=dict)
    objective: Objective | None = None
    resumed_from_step: int | None = None
    compile_seconds: float | None = None
    compile_decision: str | None = None

    @property
    def num_steps(self) -> int:
        return len(self.history)

    def __repr__(self) -> str:
        """One line: steps, final loss, skips, why it stopped, the objective and the parameter names
        (the whole history and the parameter values stay in the attributes)."""
        final = f"{self.history[-1]:.6g}" if self.history else "none"
        parts = [f"{self.num_steps} steps", f"final loss {final}", f"{self.num_skipped} skipped"]
        parts.append(f"stop_reason={self.stop_reason!r}")
        if self.objective is not None:
            parts.append(f"objective={self.objective!r}")
        if self.resumed_from_step is not None:
            parts.append(f"resumed_from_step={self.resumed_from_step}")
        if self.compile_seconds is not None:
            parts.append(f"compile_seconds={self.compile_seconds:.1f}")
        names = list(self.params)
        shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
        parts.append(f"params=[{shown}]")
        return f"FitResult({', '.join(parts)})"

    def plot(self, ax: Any = None) -> Any:
        """The loss curve (and validation loss). Returns the figure."""
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5)) if ax is None else (ax.figure, ax)
        losses = np.asarray(self.history, dtype=float)
        ax.plot(losses, lw=0.6, alpha=0.5, label="loss")
        window = max(1, len(losses) // 50)
        if window > 1:
            kernel = np.ones(window) / window
            ax.plot(np.arange(window - 1, len(losses)), np.convolve(losses, kernel, "valid"), label=f"mean of {window}")
        if self.validation_history:
            steps, values = zip(*self.validation_history)
            ax.plot(steps, values, "o-", ms=3, label="validation")
        name = type(self.objective).__name__ if self.objective is not None else "objective"
        ax.set_xlabel("step")
        ax.set_ylabel(f"{name} loss")
        finite = losses[np.isfinite(losses)]
        if finite.size and finite.min() > 0 and finite.max() / max(finite.min(), 1e-300) > 100:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig
