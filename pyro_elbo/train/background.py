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
nothing (and on one without, it is not forked). It writes nothing but the
compiler's caches: its standard output and error go to ``os.devnull``, its warnings are ignored,
it ignores SIGINT (the parent's own handling of Ctrl-C stops the run, and the child is killed
then), and it leaves through ``os._exit``, so no ``atexit`` handler, buffered stream or ``finally``
block of the parent runs in it. The parent never waits for it: it kills it (SIGKILL) and reaps it
when the run ends for any reason (before the run's checkpoint lock is released: the child holds a
copy of its file descriptor), so a child that never finishes (or hangs) leaves the run eager and
cannot keep it waiting.

Forking is used only where it is safe (:func:`why_not_fork`): for backends with on-disk caches, on
platforms with ``os.fork``, with every parameter on the CPU (a CUDA context does not survive a
fork), and outside ``torch.distributed`` runs (the child would share the parent's process-group
connections); and only where it pays: when a core stood idle beside the training process
(:class:`CpuMeter`). A child without a core of its own takes CPU time from the eager steps it was
meant to run beside, and the run ends later than with the compile in the foreground. On Linux the
child also dies with the parent (``PR_SET_PDEATHSIG``), so even a parent killed by SIGKILL leaves
no compile running.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

#: the child's exit status when the compiled graph was built (anything else is a failure)
BUILT = 0
#: the child's exit status when the compiled step fell back to eager (the capture failed)
NOT_BUILT = 3
#: the child's exit status when the compiled step raised
RAISED = 4


#: the compile backends whose work a child process can leave on disk for the parent
CACHED_BACKENDS: tuple[str, ...] = ("inductor",)


#: a child is forked only when at least this many cores stood idle beside the training process:
#: one for the compile and one to spare, as the eager steps beside a compile with only one idle
#: core (of two) were measured ~30% slower
SPARE_CORES = 1.8

#: the idle CPU time is measured over at least this many seconds of training (``/proc/stat``
#: counts in ticks of 10 ms: a shorter window cannot tell 0.8 of a core from 1)
CPU_WINDOW_SECONDS = 0.25

#: Linux's ``prctl`` option that sends the child a signal when its parent dies
_PR_SET_PDEATHSIG = 1


def why_not_fork(params: dict[str, torch.Tensor], backend: str, distributed: bool) -> str | None:
    """Why a child process may not compile for this run (``None``: it may): the backend must
    cache on disk (:data:`CACHED_BACKENDS`), ``os.fork`` must exist, every parameter must live on
    the CPU and the run must not be a ``torch.distributed`` one."""
    if backend not in CACHED_BACKENDS:
        return f"the {backend!r} backend keeps no on-disk cache for a child to fill"
    if not hasattr(os, "fork"):
        return "this platform has no os.fork"
    devices = sorted({p.device.type for p in params.values()} - {"cpu"})
    if devices:
        return f"parameters live on {', '.join(devices)} (a fork does not carry its context)"
    if distributed:
        return "a torch.distributed run (a child would share its process group)"
    return None


@dataclass(frozen=True)
class IdleCores:
    """How much CPU stood idle beside the training process, and how much of a core it got.

    Attributes:
        idle: idle cores, averaged over the window (0.5: one core idle half of the time).
        cores: the cores this process may use (its CPU affinity, capped by a cgroup quota).
        seconds: the window.
        source: ``"/proc/stat"`` (measured over the window) or ``"load average"`` (the last
            minute's, where ``/proc/stat`` is missing).
        share: the CPU seconds this process used per second of the window, at most 1 (a
            compile runs on one core): on a machine busy with other work a compile in the
            foreground takes its CPU time divided by this.
    """

    idle: float
    cores: float
    seconds: float
    source: str
    share: float = 1.0

    def __str__(self) -> str:
        return f"{self.idle:.2f} of {self.cores:g} cores idle over {self.seconds:.2f} s"


class CpuMeter:
    """Idle time of the cores this process may run on, and the process's own CPU time, from the
    meter's creation to :meth:`read`: per core, the share of ``/proc/stat``'s ticks spent idle (or waiting for I/O),
    summed over the process's CPU affinity. Under a cgroup CPU quota of :math:`Q` cores the idle
    cores are at most :math:`Q - 1` (the training process holds one). Without ``/proc/stat`` the
    estimate is :math:`\\max(0,\\ n - 1 - L)` for :math:`n` cores and the last minute's load
    average :math:`L`, which errs towards no idle core (it may count this process already)."""

    def __init__(self) -> None:
        self.cpus = _affinity()
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        self.ticks = _idle_and_total_ticks(self.cpus)

    def elapsed(self) -> float:
        """Seconds since the meter was created."""
        return time.perf_counter() - self.start

    def read(self) -> IdleCores:
        """The idle cores since the meter was created."""
        seconds = self.elapsed()
        share = min(1.0, (time.process_time() - self.cpu_start) / seconds) if seconds > 0 else 1.0
        quota = _cpu_quota()
        cores = float(len(self.cpus)) if quota is None else min(float(len(self.cpus)), quota)
        now = _idle_and_total_ticks(self.cpus)
        if self.ticks is not None and now is not None and now[1] > self.ticks[1]:
            idle = len(self.cpus) * (now[0] - self.ticks[0]) / (now[1] - self.ticks[1])
            source = "/proc/stat"
        else:
            idle, source = max(0.0, cores - 1.0 - os.getloadavg()[0]), "load average"
        return IdleCores(min(idle, max(0.0, cores - 1.0)), cores, seconds, source, share)


def _affinity() -> set[int]:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def _idle_and_total_ticks(cpus: set[int]) -> tuple[int, int] | None:
    """Idle (idle + iowait) and total ticks of ``cpus`` since boot, from ``/proc/stat``; ``None``
    where it cannot be read."""
    try:
        with open("/proc/stat") as stat:
            lines = stat.read().splitlines()
    except OSError:
        return None
    idle = total = 0
    for line in lines:
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        ticks = [int(value) for value in fields[:8]]  # user nice system idle iowait irq softirq steal
        idle, total = idle + ticks[3] + ticks[4], total + sum(ticks)
    return (idle, total) if total else None


def _cpu_quota() -> float | None:
    """The cgroup v2 CPU quota of this process in cores (``cpu.max``), ``None`` without one."""
    try:
        with open("/proc/self/cgroup") as groups:
            path = next((line.strip()[3:] for line in groups if line.startswith("0::")), None)
        if path is None:
            return None
        with open(os.path.join("/sys/fs/cgroup", path.lstrip("/"), "cpu.max")) as limit:
            quota, period = limit.read().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def die_with_parent(parent: int) -> None:
    """In the child: ask Linux for SIGKILL when the parent dies, and exit at once if it already
    has (elsewhere, nothing: the parent's own exit paths kill the child)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request
        os._exit(RAISED)


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
        parent = os.getpid()
        try:
            pid = os.fork()
        except OSError:
            return None
        if pid == 0:  # the child: never returns into the caller
            status = RAISED
            try:
                die_with_parent(parent)
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
