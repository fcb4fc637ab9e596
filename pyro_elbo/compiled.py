"""Old module name of the compiled path: re-exports the names it had from :mod:`pyro_elbo.compile`."""

from pyro_elbo.compile.graph import (  # noqa: F401
    LEDGER_FIELDS,
    AdamBuffers,
    AdamMoments,
    AdamScalars,
    CompiledLoss,
    Layout,
    Ledger,
    LossFunction,
    Signature,
    SVICompiledSteps,
    adam_moments,
    adam_scalars,
    adam_step,
    all_finite,
    flat_adam_update,
    graph_writes_inputs,
    guarded_step,
    plain_adam,
    split,
)
