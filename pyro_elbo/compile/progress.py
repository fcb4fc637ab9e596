"""One line of progress while a training step compiles (tracing, inductor).

The compiled path spends seconds to minutes in the step that captures: tracing the step into a
graph (:func:`~pyro_elbo._pyro.capture.trace_step`) and compiling it
(:func:`~pyro_elbo.compile.inductor.compile_graph`). Code doing such work wraps it in :func:`phase`;
nothing is shown unless a caller asked for it with a :class:`CompileProgress` (``fit``'s progress
bar does). While it is active a line is redrawn twice a second::

    compiling the step: trace 0.8 s, inductor 4.1 s...

and :meth:`CompileProgress.finish` replaces it with
``compiled the step in 5.3 s (trace 0.8 s, inductor 4.5 s, cache hit)``. Without a ``show``
function the line goes to stderr (redrawn on a terminal; only the final line on a file or pipe).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any, TextIO

#: ``show(text, final)``: draw the running line (``final=False``), or write the finished one
#: (``final=True``; an empty ``text`` clears the line: the compile ended without a summary)
Show = Callable[[str, bool], None]


@dataclass
class Phase:
    """A phase being timed; ``note`` (e.g. ``"cache hit"``) is shown after its seconds."""

    name: str
    start: float
    seconds: float | None = None
    note: str = ""

    def text(self, now: float) -> str:
        seconds = now - self.start if self.seconds is None else self.seconds
        return f"{self.name} {seconds:.1f} s" + (f", {self.note}" if self.note else "")


class CompileProgress:
    """Shows the :func:`phase` calls made while it is active (``with``, or ``start``/``stop``).

    Args:
        show: draws the line; by default :func:`stream_show` on stderr.
        label: the line's first words.
        interval: seconds between redraws of a running phase.
    """

    def __init__(self, show: Show | None = None, label: str = "compiling the step", interval: float = 0.5) -> None:
        self.show = show if show is not None else stream_show(sys.stderr)
        self.label, self.interval = label, interval
        self.phases: list[Phase] = []
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None
        self.token: Token[CompileProgress | None] | None = None

    def start(self) -> None:
        """Receive the phases of this context from now on."""
        self.token = _current.set(self)

    def begin(self, name: str) -> Phase:
        entry = Phase(name, time.perf_counter())
        with self.lock:
            self.phases.append(entry)
        if self.thread is None:
            self.wake.clear()
            self.thread = threading.Thread(target=self._tick, name="pyro_elbo compile progress", daemon=True)
            self.thread.start()
        self._draw()
        return entry

    def _tick(self) -> None:
        while not self.wake.wait(self.interval):
            self._draw()

    def _draw(self) -> None:
        with self.lock:
            if self.phases:
                parts = ", ".join(p.text(time.perf_counter()) for p in self.phases)
                self.show(f"{self.label}: {parts}...", False)

    def finish(self, write: bool = True) -> str | None:
        """Write the finished line of the phases so far and forget them; returns it (``None`` if
        no phase ran). ``write=False`` clears the line instead (e.g. the capture failed and the
        step runs eagerly: a fallback warning says so)."""
        if self.thread is not None:
            self.wake.set()
            self.thread.join()
            self.thread = None
        with self.lock:
            phases, self.phases = self.phases, []
        if not phases:
            return None
        if not write:
            self.show("", True)
            return None
        now = time.perf_counter()
        total = sum(p.seconds if p.seconds is not None else now - p.start for p in phases)
        words = self.label.replace("compiling", "compiled", 1)
        text = f"{words} in {total:.1f} s ({', '.join(p.text(now) for p in phases)})"
        self.show(text, True)
        return text

    def stop(self, write: bool = True) -> str | None:
        """:meth:`finish`, and receive no more phases."""
        if self.token is not None:
            try:
                _current.reset(self.token)
            except ValueError:  # stopped from another context than it started in: it ends there
                pass
            self.token = None
        return self.finish(write)

    def __enter__(self) -> CompileProgress:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def stream_show(stream: TextIO) -> Show:
    """Draw on ``stream``: redrawn in place (``\\r``) on a terminal, only finished lines otherwise."""
    live = bool(getattr(stream, "isatty", lambda: False)())
    width = 0

    def show(text: str, final: bool) -> None:
        nonlocal width
        if not (live or final) or not (live or text):
            return
        pad = " " * max(0, width - len(text)) if live else ""
        width = 0 if final else len(text)
        end = ("\n" if text else "\r") if final else ""
        stream.write(("\r" if live else "") + text + pad + end)
        stream.flush()

    return show


_current: ContextVar[CompileProgress | None] = ContextVar("pyro_elbo_compile_progress", default=None)


@contextmanager
def phase(name: str) -> Iterator[Phase]:
    """Time the block as phase ``name`` of the active :class:`CompileProgress`, if any (else only
    time it). Set ``.note`` on the yielded :class:`Phase` to add words after its seconds."""
    progress = _current.get()
    entry = progress.begin(name) if progress is not None else Phase(name, time.perf_counter())
    try:
        yield entry
    finally:
        entry.seconds = time.perf_counter() - entry.start
