"""Old module name of the compiled path: re-exports the names it had from :mod:`pyro_elbo.compile`."""

from pyro_elbo.compile.adam import (  # noqa: F401
    LEDGER_FIELDS,
    AdamBuffers,
    AdamMoments,
    AdamScalars,
    Layout,
    Ledger,
    adam_moments,
    adam_scalars,
    adam_step,
    all_finite,
    flat_adam_update,
    guarded_step,
    plain_adam,
    split,
)
from pyro_elbo.compile.graph import CompiledLoss, LossFunction, Signature, graph_writes_inputs  # noqa: F401
from pyro_elbo.compile.svi import SVICompiledSteps  # noqa: F401
