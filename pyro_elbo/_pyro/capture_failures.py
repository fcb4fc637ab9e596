"""Why a step could not be captured, in the user's terms: the site, the operation, what to change.

A failed ``make_fx`` trace ends deep inside torch's symbolic-shape machinery with a message about
symbols (``Could not guard on data-dependent expression Eq(u0, 1)``), or with none at all once Pyro
has re-raised it with the trace's shapes. :func:`describe_failure` reads the tracebacks instead (of
the error and of the errors it was raised from or while handling): the
innermost frame of the user's code (the line of the model or guide), the innermost frame outside
torch's tracing machinery (the operation that needed a value), and what the frames held (a
``PackedSequence``), and says what cannot be captured and what to change.
"""

from __future__ import annotations

import linecache
import os
import sys
import sysconfig
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pyro
import torch

from pyro_elbo.compile.torch_internals import data_dependent_origins, is_data_dependent

_TORCH = os.path.dirname(os.path.abspath(torch.__file__))
_PYRO = os.path.dirname(os.path.abspath(pyro.__file__))
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # pyro_elbo
_PACKAGE_DIR = os.path.join(_PACKAGE, "")
#: torch's tracing and dispatch machinery: never the operation a user wrote
_MACHINERY = tuple(
    os.path.join(_TORCH, part)
    for part in (
        "fx/",
        "_subclasses/",
        "_dynamo/",
        "_prims/",
        "_prims_common/",
        "_refs/",
        "_decomp/",
        "_library/",
        "_higher_order_ops/",
        "utils/",
        "_logging/",
        "_ops.py",
        "_meta_registrations.py",
        "_compile.py",
        "_guards.py",
        "__init__.py",
        "_tensor.py",
        "overrides.py",
    )
)
#: installed code (torch, Pyro, this package, the standard library, site-packages): not the user's
_LIBRARIES = tuple(
    os.path.join(path, "")
    for path in (
        _TORCH,
        _PYRO,
        _PACKAGE,
        *(sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")),
    )
)

_VALUE_FIX = (
    "compile=True records one graph for every step, so a Python value cannot come from a tensor's "
    "value: use tensor operations instead (torch.where, masks, poutine.mask), pass the numbers the "
    "model branches on as Python numbers rather than tensors, or use compile=False"
)
_SIZE_FIX = (
    "compile=True records one graph for every step, so a size cannot depend on a tensor's values: keep "
    "the full shape and mask what should not count instead (the distribution's .mask(...), or "
    "poutine.mask), or use compile=False"
)
_PACKED_FIX = (
    "a packed batch's layout is computed from the values of its lengths, which must be host integers, "
    "so compile=True cannot capture it: run the RNN on the padded batch and mask the steps past each "
    "sequence's length (the distribution's .mask(...), or poutine.mask) instead of packing, or use "
    "compile=False"
)


@dataclass
class _Frame:
    path: str
    line: int
    function: str
    source: str

    @property
    def generated(self) -> bool:
        """Code without a file (``<string>``: the wrapper ``make_fx`` generates)."""
        return self.path.startswith("<") or os.path.basename(self.path).startswith("<")

    def __str__(self) -> str:
        where = f"{_display(self.path)}:{self.line} in {self.function}"
        return f"{where} (`{self.source}`)" if self.source else where


def describe_failure(error: BaseException) -> str:
    """A one-line account of a failed trace: what the model or guide does that cannot be captured,
    at which line of the user's code, through which operation, and what to change.

    The blamed line is always the user's, never this package's: a guard on a data-dependent size
    that fails in the package's own code (a check on a sample site, possibly after the model
    returned) is blamed on the user's line that made the size (``x[mask]``), else on the user's
    innermost line on the stack."""
    frames, packed = _user_frames(error)
    user = next((f for f in reversed(frames) if _is_user(f)), None)
    innermost = next((f for f in reversed(frames) if not f.path.startswith(_MACHINERY) and not f.generated), None)
    in_package = innermost is not None and innermost.path.startswith(_PACKAGE_DIR)
    operation = None if in_package else innermost
    role = _role(frames)
    if (user is None or in_package) and _data_dependent(error):
        origin = _size_origin(error)
        if origin is not None:
            made, stack = origin
            role = _role(stack) if role == "the model/guide" else role
            return f"{role} makes a tensor whose size depends on tensor values (a boolean mask, nonzero) at {made}; {_SIZE_FIX}"
    site = user or operation
    at = f" at {site}" if site else ""
    via = (
        f", through {operation}"
        if operation and user and (operation.path, operation.line) != (user.path, user.line)
        else ""
    )
    if packed:
        return f"{role} runs a PackedSequence (torch.nn.utils.rnn.pack_padded_sequence) through an RNN{at}{via}; {_PACKED_FIX}"
    if _data_dependent(error):
        return f"{role} turns a tensor's value into a Python value (an if, int(), float(), bool() or a size){at}{via}; {_VALUE_FIX}"
    message = _first_message(error)
    if "numpy" in message.lower():
        return f"{role} converts a tensor to NumPy{at}{via}; the capture sees no values: use torch operations, or compile=False"
    return f"{role} cannot be traced{at}{via}: {message}"


def _size_origin(error: BaseException) -> tuple[_Frame, list[_Frame]] | None:
    """The user's line that made a data-dependent size a refused guard in ``error``'s chain asked
    about (its innermost user frame when the size was created), with that creation's stack."""
    for e in _chain(error):
        if not _guard_on_data(e):
            continue
        try:
            stacks = data_dependent_origins(e)
        except Exception:  # torch's shape environment changed: the message names no line rather than ours
            return None
        for stack in stacks:
            frames = [_frame(path, line, function) for path, line, function in stack]
            made = next((f for f in reversed(frames) if _is_user(f)), None)
            if made is not None:
                return made, frames
    return None


def user_stacklevel() -> int:
    """The ``stacklevel`` at which a warning issued by the caller points at the innermost frame
    outside this package (the user's call of ``fit``, ``step`` or ``SVI.step``), never at the
    package's own line: ``warnings.warn(..., stacklevel=user_stacklevel())``."""
    frame, level = sys._getframe(1), 1  # the caller's frame is stacklevel 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


def _is_user(frame: _Frame) -> bool:
    return not frame.path.startswith(_LIBRARIES) and not frame.generated


def _user_frames(error: BaseException) -> tuple[list[_Frame], bool]:
    """The frames of the first error in ``error``'s chain (``__cause__``/``__context__``, outermost
    first) whose traceback reaches the user's code, else the outermost error's frames; and whether
    any error's frames held a ``PackedSequence``. A tracer that fails while handling the real error
    (raising another from torch's own frames) keeps the user's line in the chained error."""
    chosen: list[_Frame] | None = None
    packed = False
    outermost: list[_Frame] = []
    for e in _chain(error):
        frames, held = _frames(e.__traceback__)
        packed = packed or held
        if e is error:
            outermost = frames
        if chosen is None and any(_is_user(f) for f in frames):
            chosen = frames
    return (outermost if chosen is None else chosen), packed


def _frame(path: str, line: int, function: str) -> _Frame:
    return _Frame(os.path.abspath(path), line, function, linecache.getline(path, line).strip())


def _frames(tb: TracebackType | None) -> tuple[list[_Frame], bool]:
    """The traceback's frames, outermost first, and whether any of them held a ``PackedSequence``."""
    frames, packed = [], False
    for frame, line in traceback.walk_tb(tb):
        code = frame.f_code
        source = linecache.getline(code.co_filename, line).strip()
        frames.append(_Frame(os.path.abspath(code.co_filename), line, code.co_name, source))
        packed = packed or any(isinstance(v, torch.nn.utils.rnn.PackedSequence) for v in frame.f_locals.values())
    return frames, packed


def _role(frames: list[_Frame]) -> str:
    """Which program was running: the innermost of the guide's and the model's runs."""
    tracing = os.path.join(_PACKAGE, "_pyro", "tracing.py")
    for frame in reversed(frames):
        if frame.path == tracing and frame.function in ("trace_guide", "run_model"):
            return "the guide" if frame.function == "trace_guide" else "the model"
    return "the model/guide"


def _chain(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _data_dependent(error: BaseException) -> bool:
    names = ("DataDependentOutputException", "DynamicOutputShapeException", "GuardOnDataDependentSymNode")
    return any(type(e).__name__ in names or _guard_on_data(e) for e in _chain(error))


def _guard_on_data(error: BaseException) -> bool:
    try:
        return is_data_dependent(error)
    except Exception:  # torch's class moved or changed: the names above still recognise the error
        return False


def _first_message(error: BaseException) -> str:
    """The first non-empty line of the innermost error that has one, with its type."""
    for e in reversed(_chain(error)):
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        if lines:
            return f"{type(e).__name__}: {lines[0]}"
    return type(error).__name__


def _display(path: str) -> str:
    """Library files relative to their site-packages (``torch/nn/modules/rnn.py``), others to the
    working directory when under it."""
    for root in (_TORCH, _PYRO, _PACKAGE):
        if path.startswith(root + os.sep):
            return os.path.relpath(path, os.path.dirname(root))
    try:
        relative = Path(path).relative_to(Path.cwd())
    except ValueError:
        return path
    return str(relative)
