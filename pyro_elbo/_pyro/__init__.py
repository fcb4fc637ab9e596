"""Everything that runs Pyro's effect handlers (``pyro.poutine``) lives in this package.

- :mod:`.log_weights`: :class:`LogWeights` and :func:`log_weights`, the core abstraction;
- :mod:`.params`: parameter discovery, :func:`loss_and_params`, running a program with its
  parameters detached or substituted;
- :mod:`.draws`: guide draws in each site's natural shape, for export;
- :mod:`.inspect`: model structure for diagnostics (site dependencies, free local guides);
- :mod:`.checks`: model/guide validation with errors that name the site.

No module outside this package imports ``pyro.poutine`` (``tests/test_architecture.py``).
"""
