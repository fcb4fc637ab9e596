"""pyro_elbo: better variational objectives, KL-gap diagnostics, fast training and ArviZ export for Pyro."""

from pyro_elbo.arviz import to_inference_data
from pyro_elbo.diagnostics import GapDecomposition, KLGapReport, gap_decomposition, gradient_snr, kl_gap
from pyro_elbo.objectives import CUBO, ELBO, IWAE, STL, VIMCO, DReG, Objective, RenyiELBO, make_objective
from pyro_elbo.train import FitResult, NonFiniteLossError, fit, load_checkpoint
from pyro_elbo.weights import LogWeights, log_weights

__version__ = "0.1.0"

__all__ = [
    "CUBO",
    "DReG",
    "ELBO",
    "FitResult",
    "GapDecomposition",
    "IWAE",
    "KLGapReport",
    "LogWeights",
    "NonFiniteLossError",
    "Objective",
    "RenyiELBO",
    "STL",
    "VIMCO",
    "fit",
    "gap_decomposition",
    "gradient_snr",
    "kl_gap",
    "load_checkpoint",
    "log_weights",
    "make_objective",
    "to_inference_data",
]
