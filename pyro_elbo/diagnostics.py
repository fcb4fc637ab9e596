"""Did variational inference work? The diagnostics in one namespace (re-exported):

- :mod:`pyro_elbo.kl_gap`: :func:`kl_gap`, the KL gap bracketed from both sides, and its report;
- :mod:`pyro_elbo.psis`: :func:`psis_khat` and :func:`effective_sample_size` of importance weights;
- :mod:`pyro_elbo.snr`: :func:`gradient_snr` of an objective;
- :mod:`pyro_elbo.gap`: :func:`gap_decomposition`, approximation vs amortization gap.
"""

from __future__ import annotations

from pyro_elbo._pyro.log_weights import LogWeights
from pyro_elbo.gap import GapDecomposition, gap_decomposition
from pyro_elbo.kl_gap import Estimate, KLGapReport, kl_gap
from pyro_elbo.psis import effective_sample_size, psis_khat
from pyro_elbo.snr import gradient_snr

__all__ = [
    "Estimate",
    "GapDecomposition",
    "KLGapReport",
    "LogWeights",
    "effective_sample_size",
    "gap_decomposition",
    "gradient_snr",
    "kl_gap",
    "psis_khat",
]
