"""pyro_elbo: better variational objectives, KL-gap diagnostics, fast training and ArviZ export for Pyro."""

from pyro_elbo._pyro.particles import ParticlePathWarning
from pyro_elbo.arviz import to_inference_data
from pyro_elbo.diagnostics import GapDecomposition, KLGapReport, gap_decomposition, gradient_snr, kl_gap
from pyro_elbo.estimators import Estimator
from pyro_elbo.evidence import Evidence, Sandwich, bdmc, log_evidence
from pyro_elbo.loo import VariationalLooWarning as VariationalLooWarning
from pyro_elbo.loo import loo as loo
from pyro_elbo.objectives import CUBO, ELBO, IWAE, STL, VIMCO, DReG, Objective, RenyiELBO, make_objective
from pyro_elbo.train import FitResult, NonFiniteLossError, fit, load, load_checkpoint
from pyro_elbo.weights import LogWeights, log_weights

__version__ = "0.1.0"

__all__ = [
    "CUBO",
    "DReG",
    "ELBO",
    "Estimator",
    "Evidence",
    "FitResult",
    "GapDecomposition",
    "IWAE",
    "KLGapReport",
    "LogWeights",
    "NonFiniteLossError",
    "Objective",
    "ParticlePathWarning",
    "RenyiELBO",
    "STL",
    "Sandwich",
    "VIMCO",
    "VariationalLooWarning",
    "bdmc",
    "fit",
    "gap_decomposition",
    "gradient_snr",
    "kl_gap",
    "load",
    "load_checkpoint",
    "log_evidence",
    "log_weights",
    "loo",
    "make_objective",
    "to_inference_data",
]
