"""What :func:`~pyro_elbo.train.fit` returns, and the error of a refused step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

from pyro_elbo.objectives import Objective

if TYPE_CHECKING:
    from pyro_elbo.compile.inductor import CompileStats


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
        compile_decision: with ``compile="auto"`` (or a ``compile=True`` that stayed eager), which path ran
            and why (one line).
        compile_stats: what compiling the step did (:class:`~pyro_elbo.compile.inductor.CompileStats`:
            inductor's cache outcome, ``"hit"`` when the kernels were loaded from an earlier run's
            compile; a fallback to ``torch.compile`` and why); ``None`` when nothing was compiled.
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
    compile_stats: CompileStats | None = None

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

    def plot(self, ax: Any = None, tail: float = 0.5) -> Any:
        """The loss curve with its running mean (and the validation loss). Returns the figure.

        The first steps' losses are often orders of magnitude above the last ones and set the
        scale, so that late convergence (or its absence) is a flat line. Without ``ax`` the figure
        has two panels: the whole run (log-scaled when the losses span more than a factor of 100)
        and its last ``tail`` fraction of steps on their own scale (0 for the whole run only).
        With ``ax`` the whole run is drawn there.
        """
        import matplotlib.pyplot as plt

        losses = np.asarray(self.history, dtype=float)
        start = int(len(losses) * (1 - tail)) if 0 < tail < 1 and len(losses) >= 20 else None
        if ax is None and start is not None:
            fig, (ax, tail_ax) = plt.subplots(1, 2, figsize=(10, 3.5))
        else:
            fig, ax = plt.subplots(figsize=(6, 3.5)) if ax is None else (ax.figure, ax)
            tail_ax = None
        name = type(self.objective).__name__ if self.objective is not None else "objective"
        self._draw_losses(ax, losses, 0)
        finite = losses[np.isfinite(losses)]
        if finite.size and finite.min() > 0 and finite.max() / max(finite.min(), 1e-300) > 100:
            ax.set_yscale("log")
        ax.set_ylabel(f"{name} loss")
        ax.set_title("the whole run", fontsize=9)
        ax.legend(fontsize=8)
        if tail_ax is not None and start is not None:
            self._draw_losses(tail_ax, losses, start)
            shown = losses[start:][np.isfinite(losses[start:])]
            if shown.size:  # the tail's own scale: its 1st to 99th percentile, a little margin
                low, high = np.percentile(shown, [1, 99])
                margin = 0.1 * (high - low) or 0.05 * abs(high) or 1.0
                tail_ax.set_ylim(low - margin, high + margin)
            tail_ax.set_title(f"the last {len(losses) - start} steps, on their own scale", fontsize=9)
        fig.tight_layout()
        return fig

    def _draw_losses(self, ax: Any, losses: np.ndarray, start: int) -> None:
        """Losses from ``start`` on, their running mean over 1/50 of the run, the validation losses."""
        steps = np.arange(len(losses))
        ax.plot(steps[start:], losses[start:], lw=0.6, alpha=0.5, label="loss")
        window = max(1, len(losses) // 50)
        if window > 1:
            mean = np.convolve(losses, np.ones(window) / window, "valid")
            mean_steps = np.arange(window - 1, len(losses))
            keep = mean_steps >= start
            ax.plot(mean_steps[keep], mean[keep], label=f"mean of {window}")
        if self.validation_history:
            points = [(s, v) for s, v in self.validation_history if s >= start]
            if points:
                ax.plot(*zip(*points), "o-", ms=3, label="validation")
        ax.set_xlabel("step")
