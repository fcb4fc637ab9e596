"""Training: :func:`fit` (the loop with hooks), and :func:`init`/:func:`step` with an explicit
:class:`TrainState` for loops of your own.

Modules: :mod:`~pyro_elbo.train.loop` (``init``, ``fit``), :mod:`~pyro_elbo.train.step` (one
step), :mod:`~pyro_elbo.train.state` (``TrainState`` and its ``state_dict``),
:mod:`~pyro_elbo.train.checkpoint` (files), :mod:`~pyro_elbo.train.data` (data order),
:mod:`~pyro_elbo.train.hooks` (progress, validation, checkpoints, callbacks, early stopping),
:mod:`~pyro_elbo.train.memory` (particle-count check), :mod:`~pyro_elbo.train.autocompile`
(``compile="auto"``), :mod:`~pyro_elbo.train.background` (its compile in a child process), :mod:`~pyro_elbo.compile.flat` (flat parameter/Adam buffers of the compiled step), :mod:`~pyro_elbo.train.signals` (stopping cleanly
on SIGTERM/SIGINT), :mod:`~pyro_elbo.train.lock` (one writer per checkpoint path).
"""

from pyro_elbo.train.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from pyro_elbo.train.hooks import Callbacks, Checkpointer, EarlyStopping, Hook, Progress, Validation
from pyro_elbo.train.loading import load
from pyro_elbo.train.loop import fit, init
from pyro_elbo.train.result import FitResult, NonFiniteLossError
from pyro_elbo.train.signals import TrainingTerminated
from pyro_elbo.train.state import TrainState
from pyro_elbo.train.step import StepInfo, step

__all__ = [
    "CHECKPOINT_FORMAT",
    "Callbacks",
    "Checkpointer",
    "EarlyStopping",
    "FitResult",
    "Hook",
    "NonFiniteLossError",
    "Progress",
    "StepInfo",
    "TrainState",
    "TrainingTerminated",
    "Validation",
    "fit",
    "init",
    "load",
    "load_checkpoint",
    "save_checkpoint",
    "step",
]
