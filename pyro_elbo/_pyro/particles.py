"""How ``S`` particles are drawn: one plate, ``torch.func.vmap``, or one at a time.

Three paths, fastest first:

- ``"plate"``: model and guide run once inside an outer ``pyro.plate`` of size ``S``. Needs a
  model written for batched latents (most of Pyro's examples are not: ``x @ w``, ``nn.Linear`` on a
  sampled weight, ``.t()`` of a latent).
- ``"vmap"``: a single-particle program vectorized by ``torch.func.vmap(randomness="different")``;
  runs most unbatched models at close to plate speed. While it runs, operations vmap cannot batch
  are replaced by equivalents it can (:func:`_vmappable_randomness`): ``_standard_normal`` of
  ``torch.distributions`` (an in-place draw) by ``torch.randn``; Dirichlet (hence Beta) draws,
  an ``autograd.Function``, by normalized Gamma draws (:func:`_dirichlet_rsample`, reparameterized
  through ``torch._standard_gamma``); and the fused recurrent cells ``nn.LSTMCell``,
  ``nn.GRUCell`` and ``nn.RNNCell`` (no batching rule) by their gate equations
  (:func:`_lstm_cell`, :func:`_gru_cell`, :func:`_rnn_cell`); ``BatchNorm`` in training mode
  normalizes each particle by its own batch statistics and updates the running statistics after
  the pass (:class:`_BatchNormPerParticle`). Distribution validation (data-dependent branches) is off.
- ``"sequential"``: one particle at a time; runs every model, at ``S`` times the cost of one.

``"auto"`` (the default) tries them in that order once per model, guide and argument signature, on
two particles (values and gradients), and keeps the first that runs; when that is not the plate it
says which path it took in one :class:`ParticlePathWarning`. Every entry point (objectives,
``kl_gap``, ``gradient_snr``, ``to_inference_data``, ``fit``, the CLI) goes through
:func:`particle_path`, so they all take the same decision.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pyro
import torch
from torch import Tensor

from pyro_elbo._pyro.cache import ProgramCache
from pyro_elbo._random import forked_rng
from pyro_elbo._typing import Guide, Model

PATHS: tuple[str, ...] = ("auto", "plate", "vmap", "sequential")


class ParticlePathWarning(UserWarning):
    """The model cannot take a particle plate; particles are drawn another way (said once)."""


def normalize(mode: bool | str) -> str:
    """``True`` -> ``"plate"``, ``False`` -> ``"sequential"``, or one of :data:`PATHS`."""
    if mode is True:
        return "plate"
    if mode is False:
        return "sequential"
    if mode not in PATHS:
        raise ValueError(f"vectorize_particles must be one of {PATHS} (or True/False), got {mode!r}")
    return str(mode)


_DECISIONS = ProgramCache()


def particle_path(
    mode: bool | str,
    model: Model,
    guide: Guide,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    try_path: Callable[[str, int], None],
) -> str:
    """The path to draw particles with. ``try_path(path, num)`` runs ``num`` particles on that path
    and raises if the program cannot run there; with ``mode="auto"`` the decision is made once per
    model, guide and argument signature and remembered. If the plate fails, one particle (no plate
    at all) is tried: an error there is the program's own, and is raised as it is."""
    mode = normalize(mode)
    if mode != "auto":
        return mode
    signature = argument_signature(args, kwargs)
    decided = _DECISIONS.get(model, guide)
    if decided is not None and signature in decided:
        return str(decided[signature])
    reasons = []
    path = "sequential"
    for candidate in ("plate", "vmap"):
        try:
            with forked_rng():
                try_path(candidate, 2)
            path = candidate
            break
        except Exception as error:  # noqa: BLE001 - any failure means "not this path"
            if getattr(error, "names_a_mismatch", False):
                raise
            reasons.append(f"{candidate}: {type(error).__name__}: {_first_line(error)}")
        if candidate == "plate":
            with forked_rng():
                try_path("plate", 1)  # the program's own error, if it has one
    if decided is None:
        decided = {}
        _DECISIONS.put(model, guide, decided)
    decided[signature] = path
    if path != "plate":
        warnings.warn(
            f"pyro_elbo: the model cannot take a particle plate, so particles are drawn with "
            f"{'torch.func.vmap' if path == 'vmap' else 'one run per particle'} ({'; '.join(reasons)}). "
            "Pass vectorize_particles='sequential' (or 'vmap', 'plate') to choose the path yourself.",
            ParticlePathWarning,
            stacklevel=4,
        )
    return path


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else ""


def argument_signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """A hashable description of a call's arguments: tensors by shape, dtype and device."""

    def describe(value: Any) -> Any:
        if isinstance(value, Tensor):
            return (tuple(value.shape), value.dtype, value.device.type)
        if isinstance(value, (int, float, str, bool, type(None))):
            return value
        return type(value).__name__

    return tuple(describe(a) for a in args) + tuple(sorted((k, describe(v)) for k, v in kwargs.items()))


# --------------------------------------------------------------------------------------------
# vmap


def _randn(shape: Any, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.randn(shape, dtype=dtype, device=device)


def _dirichlet_rsample(self: Any, sample_shape: Any = ()) -> Tensor:
    """A Dirichlet draw as normalized Gamma draws: :math:`g_k \\sim \\text{Gamma}(\\alpha_k, 1)`,
    :math:`x = g / \\sum_k g_k`, reparameterized through ``torch._standard_gamma`` (implicit
    gradients, Figurnov et al., 2018). Same distribution as ``Dirichlet.rsample``, whose
    ``autograd.Function`` vmap cannot run."""
    concentration = self.concentration.expand(self._extended_shape(torch.Size(sample_shape)))
    gammas = torch._standard_gamma(concentration).clamp(min=torch.finfo(concentration.dtype).tiny)
    return gammas / gammas.sum(-1, keepdim=True)


def _gamma_rsample(self: Any, sample_shape: Any = ()) -> Tensor:
    """``Gamma.rsample`` without its in-place clamp (which vmap runs one particle at a time, with a
    warning): the same draw, its value kept above the smallest normal number, its gradient the
    unclamped one's (as there)."""
    shape = self._extended_shape(torch.Size(sample_shape))
    value: Tensor = torch._standard_gamma(self.concentration.expand(shape)) / self.rate.expand(shape)
    return value + (value.clamp(min=torch.finfo(value.dtype).tiny) - value).detach()


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.nn.functional.linear(x, weight, bias)


def _lstm_cell(
    x: Tensor, hx: Any, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None, b_hh: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``nn.LSTMCell``'s step from its gate equations (``torch.lstm_cell`` has no vmap rule)."""
    h, c = hx
    i, f, g, o = (_linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh)).chunk(4, -1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c_new), c_new


def _gru_cell(
    x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None, b_hh: Tensor | None = None
) -> Tensor:
    """``nn.GRUCell``'s step from its gate equations."""
    i_r, i_z, i_n = _linear(x, w_ih, b_ih).chunk(3, -1)
    h_r, h_z, h_n = _linear(h, w_hh, b_hh).chunk(3, -1)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


def _rnn_cell(activation: Callable[[Tensor], Tensor]) -> Callable[..., Tensor]:
    def cell(
        x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None, b_hh: Tensor | None = None
    ) -> Tensor:
        """``nn.RNNCell``'s step."""
        return activation(_linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh))

    return cell


#: ``torch._VF`` cells replaced while a vmapped program runs
_CELLS = {
    "lstm_cell": _lstm_cell,
    "gru_cell": _gru_cell,
    "rnn_tanh_cell": _rnn_cell(torch.tanh),
    "rnn_relu_cell": _rnn_cell(torch.relu),
}


@contextlib.contextmanager
def _vmappable_randomness() -> Iterator[None]:
    """Operations vmap cannot batch, replaced by equivalents it can, only while a vmapped program
    runs: ``torch.distributions`` draws normals in place (``empty().normal_()``), replaced by
    ``torch.randn``; ``Dirichlet.rsample`` (Beta's too) by :func:`_dirichlet_rsample` and
    ``Gamma.rsample`` by :func:`_gamma_rsample`; the
    ``torch._VF`` recurrent cells that ``nn.LSTMCell``, ``nn.GRUCell`` and ``nn.RNNCell`` call by
    their gate equations."""
    modules = [
        module
        for name, module in list(sys.modules.items())
        if name.startswith(("torch.distributions", "pyro.distributions")) and hasattr(module, "_standard_normal")
    ]
    saved: list[tuple[Any, str, Any]] = [
        (module, "_standard_normal", getattr(module, "_standard_normal"))  # noqa: B009
        for module in modules
    ]
    replacements: list[tuple[Any, str, Any]] = [(module, name, _randn) for module, name, _ in saved]
    for cls, rsample in (
        (torch.distributions.Dirichlet, _dirichlet_rsample),
        (torch.distributions.Gamma, _gamma_rsample),
    ):
        saved.append((cls, "rsample", cls.__dict__["rsample"]))
        replacements.append((cls, "rsample", rsample))
    vf = torch._VF  # what nn.LSTMCell, nn.GRUCell and nn.RNNCell call
    for name, cell in _CELLS.items():
        saved.append((vf, name, vf.__dict__.get(name)))
        replacements.append((vf, name, cell))
    for target, name, value in replacements:
        setattr(target, name, value)
    try:
        yield
    finally:
        for target, name, original in saved:
            if original is None:  # an attribute torch._VF resolves on access: remove the replacement
                delattr(target, name)
            else:
                setattr(target, name, original)


class _BatchNormPerParticle:
    """``torch.nn.functional.batch_norm`` while a vmapped program runs: in training mode each
    particle is normalized by its own batch statistics (as when particles run one at a time), and
    the running statistics, which vmap cannot update in place from per-particle values, are
    collected and applied after the pass, one particle after the other, as the sequential path
    would (``num_batches_tracked`` counts one pass)."""

    def __init__(self) -> None:
        self.original = torch.nn.functional.batch_norm
        self.buffers: list[tuple[Tensor, Tensor, float]] = []
        self.stats: list[Tensor] = []

    def __call__(
        self,
        input: Tensor,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        training: bool = False,
        momentum: float = 0.1,
        eps: float = 1e-5,
    ) -> Tensor:
        if not training or running_mean is None or running_var is None:
            return self.original(input, running_mean, running_var, weight, bias, training, momentum, eps)
        dims = [0, *range(2, input.dim())]
        detached = input.detach()
        self.buffers.append((running_mean, running_var, momentum))
        self.stats.append(torch.stack([detached.mean(dims), detached.var(dims, unbiased=True)]))
        return self.original(input, None, None, weight, bias, True, momentum, eps)

    def apply(self, stats: list[Tensor]) -> None:
        """Update the running statistics from ``stats`` (each ``[S, 2, C]``), particle by particle."""
        with torch.no_grad():
            for (running_mean, running_var, momentum), particles in zip(self.buffers, stats):
                for mean, var in particles:
                    running_mean.mul_(1 - momentum).add_(momentum * mean)
                    running_var.mul_(1 - momentum).add_(momentum * var)


def vmap_particles(one_particle: Callable[[], Any], num_particles: int) -> Any:
    """Run ``one_particle()`` (a pytree of tensors) for ``num_particles`` independent draws with
    ``torch.func.vmap(randomness="different")``: every leaf gets a leading particle dim."""
    batch_norm = _BatchNormPerParticle()

    def run(_: Tensor) -> Any:
        return one_particle(), batch_norm.stats

    torch.nn.functional.batch_norm = batch_norm
    try:
        with _vmappable_randomness(), pyro.validation_enabled(False):
            out, stats = torch.func.vmap(run, randomness="different")(torch.arange(num_particles))
    finally:
        torch.nn.functional.batch_norm = batch_norm.original
    batch_norm.apply(stats)
    return out
