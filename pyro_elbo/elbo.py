"""Deprecated module name: the objective classes live in :mod:`pyro_elbo.objectives`."""

from pyro_elbo.objectives import (  # noqa: F401
    CUBO,
    ELBO,
    IWAE,
    OBJECTIVES,
    STL,
    VIMCO,
    DReG,
    Objective,
    RenyiELBO,
    make_objective,
)
