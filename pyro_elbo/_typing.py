"""Type aliases shared by the modules.

Shape notation used throughout the package: ``S`` is the number of particles (always dim 0) and
``*B`` the shape of the *batch plates*, the plates that enclose every sample site of the model and
the guide (one bound per data point in amortized models, empty for a joint bound).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Model = Callable[..., Any]
Guide = Callable[..., Any]
