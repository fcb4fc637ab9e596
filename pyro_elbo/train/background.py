"""Compile the step in a child process while training goes on eagerly.

Inductor keeps what it compiles in on-disk caches (the FX-graph and AOTAutograd caches), keyed by
the graph and its inputs' metadata. :class:`BackgroundCompile` forks the training process right
before an eager step: the child holds the same model, guide, parameters, optimizer and data without
pickling anything, runs the compiled step once (capture and compile, filling the caches) and exits.
The parent keeps taking eager steps and polls the child's exit between steps without blocking;
once the child has exited cleanly, the parent's own capture and compile read the caches (seconds
instead of a cold compile) and the run switches to the compiled step between two steps.

The child acts on its own copy of the process: nothing it does reaches the parent's parameters,
optimizer state or random state, so the parent's eager steps draw exactly what an eager run draws.
It keeps the parent's number of intra-op threads: inductor's generated code and its cache key
depend on it (with another count the parent's compile misses the cache and compiles again). It
runs at the training process's priority (a lower one starves it on a machine busy with other
work, and the run never switches); on a machine with a core to spare it costs the eager steps
nothing, on a machine without one it shares the CPUs with them. It writes nothing but the
compiler's caches: its standard output and error go to ``os.devnull``, its warnings are ignored,
it ignores SIGINT (the parent's own handling of Ctrl-C stops the run, and the child is killed
then), and it leaves through ``os._exit``, so no ``atexit`` handler, buffered stream or ``finally``
block of the parent runs in it. The parent never waits for it: it kills it (SIGKILL) and reaps it
when the run ends for any reason (before the run's checkpoint lock is released: the child holds a
copy of its file descriptor), so a child that never finishes (or hangs) leaves the run eager and
cannot keep it waiting.

Forking is used only where it pays and is safe: for backends with on-disk caches, on platforms
with ``os.fork``, with every parameter on the CPU (a CUDA context does not survive a fork), and
outside ``torch.distributed`` runs (the child would share the parent's process-group connections).
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from collections.abc import Callable

import torch

#: the child's exit status when the compiled graph was built (anything else is a failure)
BUILT = 0
#: the child's exit status when the compiled step fell back to eager (the capture failed)
NOT_BUILT = 3
#: the child's exit status when the compiled step raised
RAISED = 4


#: the compile backends whose work a child process can leave on disk for the parent
CACHED_BACKENDS: tuple[str, ...] = ("inductor",)


def can_fork(params: dict[str, torch.Tensor], backend: str) -> bool:
    """Whether a child process may compile for this run: the backend caches on disk
    (:data:`CACHED_BACKENDS`), ``os.fork`` exists and every parameter lives on the CPU."""
    return backend in CACHED_BACKENDS and hasattr(os, "fork") and all(p.device.type == "cpu" for p in params.values())


class BackgroundCompile:
    """A child process that runs ``build`` (the compiled step, once) and exits.

    Use :meth:`start`; then :meth:`poll` between steps and :meth:`stop` when the run ends.

    Attributes:
        pid: the child's process id.
        status: ``None`` while it runs, else its exit status (a negative number: killed by that
            signal).
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.status: int | None = None

    @classmethod
    def start(cls, build: Callable[[], bool]) -> BackgroundCompile | None:
        """Fork a child that calls ``build`` (``True``: the graph was built) and exits with
        :data:`BUILT`, :data:`NOT_BUILT` or :data:`RAISED`; ``None`` when the fork fails."""
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError:
            return None
        if pid == 0:  # the child: never returns into the caller
            status = RAISED
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    status = BUILT if build() else NOT_BUILT
            except BaseException:  # noqa: BLE001 - the child reports by its exit status only
                status = RAISED
            finally:
                os._exit(status)
        return cls(pid)

    def poll(self) -> int | None:
        """The child's exit status without waiting (``None`` while it runs)."""
        if self.status is None:
            try:
                pid, raw = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: its status is lost
                self.status = RAISED
                return self.status
            if pid != 0:
                self.status = os.waitstatus_to_exitcode(raw)
        return self.status

    @property
    def built(self) -> bool:
        """The child exited having built the graph (its caches are filled)."""
        return self.poll() == BUILT

    def stop(self) -> None:
        """Kill the child if it still runs and reap it (returns at once: SIGKILL cannot be
        ignored)."""
        if self.poll() is not None:
            return
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            _, raw = os.waitpid(self.pid, 0)
            self.status = os.waitstatus_to_exitcode(raw)
        except ChildProcessError:
            self.status = -signal.SIGKILL

    def describe(self) -> str:
        """The child's exit in words, for a warning."""
        status = self.poll()
        if status is None:
            return "still running"
        if status == NOT_BUILT:
            return "the capture failed in the child"
        if status == RAISED:
            return "the compiled step raised in the child"
        if status < 0:
            return f"the child was killed by signal {-status}"
        return f"the child exited with status {status}"
