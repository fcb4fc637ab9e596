"""Stopping a run cleanly on SIGTERM and SIGINT (preemption, Ctrl-C).

Schedulers (Slurm, Kubernetes, spot instances) send SIGTERM and wait before SIGKILL. While
:func:`~pyro_elbo.fit` runs, :class:`StopSignals` replaces the handlers of SIGTERM and SIGINT with
one that only records the signal: the current step finishes, the processes agree on the step to
stop at (under ``torch.distributed`` every rank stops after the same step), the checkpoint is
written there, one line says where and how to resume, and then

- SIGINT raises ``KeyboardInterrupt`` with that line as its message, as Ctrl-C does (uncaught,
  the process exits as one interrupted by Ctrl-C, status 130), with a traceback of a few frames
  of the caller and ``fit``, not of wherever torch happened to be;
- SIGTERM raises :class:`TrainingTerminated` (a ``SystemExit`` with status 143 = 128 + 15, what a
  shell reports for a process ended by SIGTERM), so that a script ends as it would have, with
  its ``finally`` blocks run; catch it to do something else.

A handler the program installed itself (a Python function, e.g. one that requeues a Slurm job) is
called after the checkpoint is written, with the signal's number, before the exception is raised.

A second signal of the same kind while the first is being handled acts at once, as before
``fit`` (a second Ctrl-C interrupts the checkpoint's write; the write leaves the previous file
intact). Signals the program ignores (``SIG_IGN``) stay ignored, a handler is installed only in the
main thread (Python delivers signals there), and the previous handlers are restored when ``fit``
returns or raises.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import torch

from pyro_elbo import distributed

#: the signals fit stops on, and the exit status a shell reports for each (128 + signal number)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
EXIT_STATUS = {signal.SIGTERM: 143, signal.SIGINT: 130}


class TrainingTerminated(SystemExit):
    """SIGTERM stopped :func:`~pyro_elbo.fit` after a step; the checkpoint (if any) was written at
    that step. Uncaught, the process exits with status 143. ``step``, ``checkpoint`` and
    ``message`` say where."""

    def __init__(self, message: str, step: int, checkpoint: str | None) -> None:
        super().__init__(EXIT_STATUS[signal.SIGTERM])
        self.message, self.step, self.checkpoint = message, step, checkpoint


class StopSignals:
    """A context manager recording SIGTERM/SIGINT instead of acting on them (see the module)."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self.previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in STOP_SIGNALS:
            current = signal.getsignal(sig)
            if current is signal.SIG_IGN or current is None:  # ignored, or set outside Python: leave it
                continue
            self.previous[sig] = current
            signal.signal(sig, self._record)
        return self

    def _record(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if self.received is not None:  # a second signal: act as before fit
            self.restore()
            signal.raise_signal(sig)
            return
        self.received = sig

    def forward(self, sig: signal.Signals) -> None:
        """Restore the previous handlers and call the program's own handler of ``sig``, if it
        installed one (a Python function other than the default Ctrl-C handler)."""
        handler = self.previous.get(sig)
        self.restore()
        if callable(handler) and handler is not signal.default_int_handler:
            handler(int(sig), None)

    def restore(self) -> None:
        """Put the previous handlers back (idempotent)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def agreed(self, context: distributed.Context) -> signal.Signals | None:
        """The signal to stop on after this step, the same on every rank: under
        ``torch.distributed`` a rank stops when any rank received a signal (SIGTERM before
        SIGINT)."""
        if not context.active:
            return self.received
        code = torch.tensor([0 if self.received is None else int(self.received)], dtype=torch.int64)
        code = distributed.max_over_ranks(code, context)
        return None if int(code) == 0 else signal.Signals(int(code))


def stop_message(sig: signal.Signals, step: int, total: int, checkpoint: str | None, written: bool) -> str:
    """The one line printed when a signal stops the run."""
    where = f"{sig.name} after step {step} of {total}"
    if checkpoint is None:
        return f"fit: stopped by {where}; no checkpoint (pass checkpoint=PATH to fit to be able to resume)"
    if written:
        return f"fit: stopped by {where}; checkpoint {checkpoint} written at step {step}; resume with resume=True"
    return f"fit: stopped by {where}; no checkpoint was written to {checkpoint}"


def stop_error(sig: signal.Signals, message: str, step: int, checkpoint: str | None) -> BaseException:
    """The exception that ends ``fit`` after ``sig`` (see the module)."""
    if sig == signal.SIGTERM:
        return TrainingTerminated(message, step, checkpoint)
    return KeyboardInterrupt(message)
