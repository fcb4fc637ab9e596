"""The public face of the core abstraction: :class:`LogWeights` and :func:`log_weights`.

The implementation lives in :mod:`pyro_elbo._pyro.log_weights`, with everything else that runs
Pyro's effect handlers.
"""

from pyro_elbo._pyro.log_weights import LogWeights, log_weights

__all__ = ["LogWeights", "log_weights"]
