"""Every SVI model of Pyro's ``examples/`` folder and SVI tutorials (Pyro at commit ``ff6ae1c95``),
written here with small synthetic data (seconds per entry point on one CPU thread).

The facts of each model (its sites, distributions, plates, masks, enumeration, baselines, the
loss the example trains with) come from Pyro's example or tutorial named in ``source``; the code is
written here. Models the zoo of ``tests/pyro_models.py`` already holds are taken from it.

:data:`EXAMPLES` maps a name to a factory of a fresh :class:`Example`; :data:`EXCLUDED` lists the
examples that run no SVI (MCMC, importance sampling, search) or need a package that is not
installed, each with the reason. ``benchmarks/pyro_examples.py`` runs every entry point of
``pyro_elbo`` on each example.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import pyro.contrib.gp as gp
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.testing.fakes import NonreparameterizedBeta
from pyro.infer import (
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
    config_enumerate,
)
from pyro.infer.autoguide import AutoDelta, AutoDiagonalNormal, AutoNormal, AutoNormalizingFlow
from pyro.nn import PyroModule, PyroSample
from pyro.ops.indexing import Vindex
from pyro_models import ZOO, ZooEntry, _seeded
from torch import Tensor, nn

#: Pyro's estimators by the name an example trains with
PYRO_LOSSES: dict[str, type[pyro.infer.ELBO]] = {
    "Trace_ELBO": Trace_ELBO,
    "TraceEnum_ELBO": TraceEnum_ELBO,
    "TraceGraph_ELBO": TraceGraph_ELBO,
    "TraceMeanField_ELBO": TraceMeanField_ELBO,
}


@dataclass
class Example(ZooEntry):
    """A :class:`ZooEntry` that also names the loss Pyro's example trains with (``pyro_loss_name``)."""

    pyro_loss_name: str = "Trace_ELBO"

    def pyro_loss(self, num_particles: int = 1) -> pyro.infer.ELBO:
        """Pyro's own estimator as the example uses it."""
        return PYRO_LOSSES[self.pyro_loss_name](num_particles=num_particles, max_plate_nesting=self.max_plate_nesting)


def _from_zoo(name: str, zoo_name: str, loss: str, source: str) -> Callable[[], Example]:
    def factory() -> Example:
        entry = ZOO[zoo_name]()
        fields = {k: getattr(entry, k) for k in ZooEntry.__dataclass_fields__}
        fields.update(name=name, source=source)
        return Example(**fields, pyro_loss_name=loss)

    factory.__name__ = name
    return factory


def _float(*shape: int) -> Tensor:
    return torch.zeros(shape, dtype=torch.get_default_dtype())


def _mlp(*sizes: int, out: nn.Module | None = None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Softplus())
    if out is not None:
        layers.append(out)
    return nn.Sequential(*layers).to(torch.get_default_dtype())


def _cat_broadcast(*tensors: Tensor) -> Tensor:
    """Concatenate on the last dim after broadcasting the batch dims (enumerated labels)."""
    batch = torch.broadcast_shapes(*(t.shape[:-1] for t in tensors))
    return torch.cat([t.expand(batch + t.shape[-1:]) for t in tensors], -1)


# --- semi-supervised VAE (examples/vae/ss_vae_M2.py; tutorial "SS-VAE") -------------------------------


class SSVAE(nn.Module):
    """M2: z ~ N(0, I), y ~ OneHotCategorical(uniform), x ~ Bernoulli(decoder(z, y)); the guide
    q(y | x) q(z | x, y), its label enumerated (``config_enumerate(guide, "parallel", expand=True)``)
    or sampled."""

    def __init__(self, x_dim: int = 64, y_dim: int = 4, z_dim: int = 3, hidden: int = 16) -> None:
        super().__init__()
        self.y_dim, self.z_dim = y_dim, z_dim
        self.encoder_y = _mlp(x_dim, hidden, y_dim, out=nn.Softmax(-1))
        self.encoder_z = _mlp(x_dim + y_dim, hidden, 2 * z_dim)
        self.decoder = _mlp(z_dim + y_dim, hidden, x_dim, out=nn.Sigmoid())

    def model(self, xs: Tensor, ys: Tensor | None = None) -> None:
        pyro.module("ss_vae", self)
        n = xs.shape[0]
        with pyro.plate("data", n):
            zs = pyro.sample("z", dist.Normal(xs.new_zeros(n, self.z_dim), 1.0).to_event(1))
            ys = pyro.sample("y", dist.OneHotCategorical(xs.new_ones(n, self.y_dim) / self.y_dim), obs=ys)
            pyro.sample(
                "x", dist.Bernoulli(self.decoder(_cat_broadcast(zs, ys)), validate_args=False).to_event(1), obs=xs
            )

    def guide(self, xs: Tensor, ys: Tensor | None = None) -> None:
        with pyro.plate("data", xs.shape[0]):
            if ys is None:
                ys = pyro.sample("y", dist.OneHotCategorical(self.encoder_y(xs)))
            loc, log_scale = self.encoder_z(_cat_broadcast(xs, ys)).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def _binary_digits(n: int) -> Tensor:
    from pyro_models import _digits

    return (_digits(n) >= 8).to(torch.get_default_dtype())


def ss_vae_enum() -> Example:
    with _seeded(10):
        net = SSVAE().to(torch.get_default_dtype())
    guide = config_enumerate(net.guide, "parallel", expand=True)
    return Example(
        "ss_vae_enum", net.model, guide, (_binary_digits(32),), 1, True, 32, "examples/vae/ss_vae_M2.py",
        pyro_loss_name="TraceEnum_ELBO",
    )  # fmt: skip


def ss_vae_sampled() -> Example:
    with _seeded(10):
        net = SSVAE().to(torch.get_default_dtype())
    return Example(
        "ss_vae_sampled", net.model, net.guide, (_binary_digits(32),), 1, False, 32,
        "examples/vae/ss_vae_M2.py (--enum-discrete none)",
    )  # fmt: skip


# --- AIR (examples/air; tutorial "Attend, Infer, Repeat") ----------------------------------------


def _affine_grid(z_where: Tensor, out_size: int, inverse: bool) -> Tensor:
    """Affine grids for the spatial transformer; ``z_where = (scale, x, y)``."""
    s, x, y = z_where.unbind(-1)
    if inverse:
        s, x, y = 1.0 / s, -x / s, -y / s
    zero = torch.zeros_like(s)
    theta = torch.stack([torch.stack([s, zero, x], -1), torch.stack([zero, s, y], -1)], -2)
    return nn.functional.affine_grid(theta, [z_where.shape[0], 1, out_size, out_size], align_corners=False)


class AIR(nn.Module):
    """Attend-Infer-Repeat: up to ``steps`` objects; per step z_pres ~ Bernoulli (masks the rest),
    z_where, z_what; an LSTMCell guide and an LSTMCell baseline network whose output is the
    ``baseline_value`` of z_pres (trained by ``TraceGraph_ELBO``)."""

    def __init__(self, size: int = 10, window: int = 4, z_what: int = 3, hidden: int = 16, steps: int = 2) -> None:
        super().__init__()
        self.size, self.window, self.z_what, self.steps = size, window, z_what, steps
        self.decode = _mlp(z_what, hidden, window * window, out=nn.Sigmoid())
        self.encode = _mlp(window * window, hidden, 2 * z_what)
        self.rnn = nn.LSTMCell(size * size + 3 + z_what + 1, hidden)
        self.predict = nn.Linear(hidden, 1 + 3 + 3)
        self.bl_rnn = nn.LSTMCell(size * size + 3 + z_what + 1, hidden)
        self.bl_predict = nn.Linear(hidden, 1)
        self.to(torch.get_default_dtype())
        self.where_loc = torch.tensor([3.0, 0.0, 0.0])
        self.where_scale = torch.tensor([0.2, 1.0, 1.0])

    def model(self, data: Tensor) -> None:
        pyro.module("decode", self.decode)
        n = data.shape[0]
        with pyro.plate("data", n):
            canvas = data.new_zeros(n, self.size, self.size)
            z_pres = data.new_ones(n, 1)
            for t in range(self.steps):
                z_pres = pyro.sample(f"z_pres_{t}", dist.Bernoulli(0.5 * z_pres).to_event(1))
                loc, scale = self.where_loc.to(data).expand(n, 3), self.where_scale.to(data).expand(n, 3)
                z_where = pyro.sample(f"z_where_{t}", dist.Normal(loc, scale).mask(z_pres).to_event(1))
                z_what = pyro.sample(
                    f"z_what_{t}", dist.Normal(data.new_zeros(n, self.z_what), 1.0).mask(z_pres).to_event(1)
                )
                window = self.decode(z_what).view(n, 1, self.window, self.window)
                grid = _affine_grid(z_where, self.size, inverse=True)
                image = nn.functional.grid_sample(window, grid, align_corners=False).view(n, self.size, self.size)
                canvas = canvas + image * z_pres.view(n, 1, 1)
            pyro.sample("obs", dist.Normal(canvas.view(n, -1), 0.3).to_event(1), obs=data.view(n, -1))

    def guide(self, data: Tensor) -> None:
        for name in ("encode", "rnn", "predict", "bl_rnn", "bl_predict"):
            pyro.module(name, getattr(self, name))
        n, hidden = data.shape[0], self.rnn.hidden_size
        flat = data.view(n, -1)
        with pyro.plate("data", n):
            h = c = bl_h = bl_c = data.new_zeros(n, hidden)
            z_pres, z_where, z_what = data.new_ones(n, 1), data.new_zeros(n, 3), data.new_zeros(n, self.z_what)
            for t in range(self.steps):
                h, c = self.rnn(torch.cat([flat, z_where, z_what, z_pres], -1), (h, c))
                out = self.predict(h)
                pres_p = torch.sigmoid(out[:, :1])
                where_loc = out[:, 1:4] + self.where_loc.to(data)
                where_scale = nn.functional.softplus(out[:, 4:7]) * self.where_scale.to(data)
                bl_input = torch.cat([flat, z_where.detach(), z_what.detach(), z_pres.detach()], -1)
                bl_h, bl_c = self.bl_rnn(bl_input, (bl_h, bl_c))
                baseline = (self.bl_predict(bl_h) * z_pres).squeeze(-1)
                z_pres = pyro.sample(
                    f"z_pres_{t}",
                    dist.Bernoulli(pres_p * z_pres).to_event(1),
                    infer={"baseline": {"baseline_value": baseline}},
                )
                z_where = pyro.sample(f"z_where_{t}", dist.Normal(where_loc, where_scale).mask(z_pres).to_event(1))
                grid = _affine_grid(z_where, self.window, inverse=False)
                window = nn.functional.grid_sample(data.view(n, 1, self.size, self.size), grid, align_corners=False)
                what_loc, what_log_scale = self.encode(window.view(n, -1)).chunk(2, -1)
                z_what = pyro.sample(
                    f"z_what_{t}", dist.Normal(what_loc, what_log_scale.exp()).mask(z_pres).to_event(1)
                )


def air() -> Example:
    with _seeded(11):
        net = AIR()
        data = torch.zeros(8, 10, 10)
        for i in range(8):  # one or two bright squares per image
            for _ in range(1 + i % 2):
                r, c = torch.randint(0, 7, (2,)).tolist()
                data[i, r : r + 3, c : c + 3] = 1.0
    return Example(
        "air", net.model, net.guide, (data.to(torch.get_default_dtype()),), 1, False, 8, "examples/air/main.py",
        pyro_loss_name="TraceGraph_ELBO",
    )  # fmt: skip


# --- CVAE (examples/cvae; tutorial "Conditional VAE") -------------------------------------------


class CVAE(nn.Module):
    """Predicts the hidden quadrants of an image from the visible one: a baseline network's guess
    y_hat (no gradient), a prior network p(z | x, y_hat), a recognition network q(z | x, y) and a
    generation network; only the hidden pixels (``xs == -1``) are observed."""

    def __init__(self, pixels: int = 64, z_dim: int = 3, hidden: int = 16) -> None:
        super().__init__()
        self.baseline_net = _mlp(pixels, hidden, pixels, out=nn.Sigmoid())
        self.prior_net = _mlp(2 * pixels, hidden, 2 * z_dim)
        self.recognition_net = _mlp(2 * pixels, hidden, 2 * z_dim)
        self.generation_net = _mlp(z_dim, hidden, pixels, out=nn.Sigmoid())

    @staticmethod
    def _normal(net: nn.Module, a: Tensor, b: Tensor) -> dist.Distribution:
        loc, log_scale = net(torch.cat([a, b], -1)).chunk(2, -1)
        return dist.Normal(loc, log_scale.exp()).to_event(1)

    def model(self, xs: Tensor, ys: Tensor) -> None:
        pyro.module("generation_net", self)
        n = xs.shape[0]
        with pyro.plate("data", n):
            with torch.no_grad():
                y_hat = self.baseline_net(xs)
            zs = pyro.sample("z", self._normal(self.prior_net, xs, y_hat))
            loc = self.generation_net(zs)
            hidden = xs == -1
            mask_loc = loc[hidden.expand(loc.shape)].view(loc.shape[:-1] + (-1,))
            mask_ys = ys[hidden].view(n, -1)
            pyro.sample("y", dist.Bernoulli(mask_loc, validate_args=False).to_event(1), obs=mask_ys)

    def guide(self, xs: Tensor, ys: Tensor) -> None:
        with pyro.plate("data", xs.shape[0]):
            pyro.sample("z", self._normal(self.recognition_net, xs, ys))


def cvae() -> Example:
    with _seeded(12):
        net = CVAE().to(torch.get_default_dtype())
    ys = _binary_digits(32)
    hidden = torch.zeros(8, 8, dtype=torch.bool)
    hidden[4:, :] = True  # the bottom half is hidden; the example hides three quadrants
    xs = torch.where(hidden.view(-1), torch.full_like(ys, -1.0), ys)
    return Example("cvae", net.model, net.guide, (xs, ys), 1, False, 32, "examples/cvae/cvae.py")


# --- scANVI (examples/scanvi/scanvi.py; tutorial "scANVI") --------------------------------------


class SCANVI(nn.Module):
    """Single-cell annotation: z1, y (one-hot label), z2 | z1, y, library size l, and zero-inflated
    negative-binomial counts; the guide's label is enumerated (``config_enumerate(guide, "parallel",
    expand=True)``) and scaled with ``poutine.scale``."""

    def __init__(self, genes: int = 12, labels: int = 3, latent: int = 2, hidden: int = 16) -> None:
        super().__init__()
        self.labels, self.latent, self.scale_factor = labels, latent, 1.0 / genes
        self.z2_decoder = _mlp(latent + labels, hidden, 2 * latent)
        self.x_decoder = _mlp(latent, hidden, 2 * genes)
        self.z2l_encoder = _mlp(genes, hidden, 2 * latent + 2)
        self.classifier = _mlp(latent, hidden, labels)
        self.z1_encoder = _mlp(latent + labels, hidden, 2 * latent)
        self.l_loc, self.l_scale = 2.0, 0.5

    def model(self, x: Tensor) -> None:
        pyro.module("scanvi", self)
        theta = pyro.param(
            "inverse_dispersion", lambda: 10.0 * x.new_ones(x.shape[-1]), constraint=constraints.positive
        )
        with pyro.plate("batch", len(x)), poutine.scale(scale=self.scale_factor):
            z1 = pyro.sample("z1", dist.Normal(0, x.new_ones(self.latent)).to_event(1))
            y = pyro.sample("y", dist.OneHotCategorical(logits=x.new_zeros(self.labels)))
            loc, log_scale = self.z2_decoder(_cat_broadcast(z1, y)).chunk(2, -1)
            z2 = pyro.sample("z2", dist.Normal(loc, log_scale.exp()).to_event(1))
            lib = pyro.sample("l", dist.LogNormal(self.l_loc, self.l_scale * x.new_ones(1)).to_event(1))
            gate_logits, mu = self.x_decoder(z2).chunk(2, -1)
            nb_logits = (lib * mu.softmax(-1) + 1e-6).log() - (theta + 1e-6).log()
            x_dist = dist.ZeroInflatedNegativeBinomial(gate_logits=gate_logits, total_count=theta, logits=nb_logits)
            pyro.sample("x", x_dist.to_event(1), obs=x)

    def guide(self, x: Tensor) -> None:
        pyro.module("scanvi", self)
        with pyro.plate("batch", len(x)), poutine.scale(scale=self.scale_factor):
            out = self.z2l_encoder((1 + x).log())
            z2_loc, z2_log_scale, l_loc, l_log_scale = out.split([self.latent, self.latent, 1, 1], -1)
            pyro.sample("l", dist.LogNormal(l_loc, l_log_scale.exp()).to_event(1))
            z2 = pyro.sample("z2", dist.Normal(z2_loc, z2_log_scale.exp()).to_event(1))
            y = pyro.sample("y", dist.OneHotCategorical(logits=self.classifier(z2)))
            loc, log_scale = self.z1_encoder(_cat_broadcast(z2, y)).chunk(2, -1)
            pyro.sample("z1", dist.Normal(loc, log_scale.exp()).to_event(1))


def scanvi() -> Example:
    with _seeded(13):
        net = SCANVI().to(torch.get_default_dtype())
        x = dist.Poisson(torch.rand(24, 12) * 5).sample().to(torch.get_default_dtype())
    guide = config_enumerate(net.guide, "parallel", expand=True)
    return Example(
        "scanvi", net.model, guide, (x,), 1, True, 24, "examples/scanvi/scanvi.py", pyro_loss_name="TraceEnum_ELBO"
    )


# --- capture-recapture CJS (examples/capture_recapture/cjs.py, model_1) -------------------------


def cjs_model_1(capture_history: Tensor) -> None:
    n, t_max = capture_history.shape
    phi = pyro.sample("phi", dist.Uniform(0.0, 1.0))
    rho = pyro.sample("rho", dist.Uniform(0.0, 1.0))
    with pyro.plate("animals", n, dim=-1):
        z = torch.ones(n, dtype=capture_history.dtype)
        first_capture = torch.zeros(n, dtype=torch.bool)
        for t in pyro.markov(range(t_max)):
            with poutine.mask(mask=first_capture):
                alive_p = first_capture.to(capture_history.dtype) * phi * z + (
                    1 - first_capture.to(capture_history.dtype)
                )
                z = pyro.sample(f"z_{t}", dist.Bernoulli(alive_p), infer={"enumerate": "parallel"})
                pyro.sample(f"y_{t}", dist.Bernoulli(rho * z), obs=capture_history[:, t])
            first_capture = first_capture | capture_history[:, t].bool()


def cjs() -> Example:
    with _seeded(14):
        history = torch.zeros(20, 5)
        alive = torch.ones(20)
        first = torch.randint(0, 3, (20,))
        for t in range(5):
            history[:, t] = ((first == t) | ((first < t) & (alive > 0) & (torch.rand(20) < 0.6))).float()
            alive = alive * ((first >= t) | (torch.rand(20) < 0.8)).float()
    guide = AutoDiagonalNormal(poutine.block(cjs_model_1, expose=["phi", "rho"]))
    history = history.to(torch.get_default_dtype())
    return Example(
        "cjs", cjs_model_1, guide, (history,), 1, True, 20, "examples/capture_recapture/cjs.py (model_1)",
        pyro_loss_name="TraceEnum_ELBO",
    )  # fmt: skip


# --- toy mixture (examples/toy_mixture_model_discrete_enumeration.py) ---------------------------


def toy_mixture_model(obs_a: Tensor, obs_c: Tensor) -> None:
    n = obs_a.shape[0]
    p_a = pyro.sample("p_A", dist.Beta(1.0, 1.0))
    p_b = pyro.sample("p_B", dist.Beta(obs_a.new_ones(2), obs_a.new_ones(2)).to_event(1))
    p_c = pyro.sample("p_C", dist.Beta(obs_a.new_ones(2), obs_a.new_ones(2)).to_event(1))
    with pyro.plate("data_plate", n):
        a = pyro.sample("A", dist.Bernoulli(p_a.expand(n)), obs=obs_a)
        b = pyro.sample("B", dist.Bernoulli(Vindex(p_b)[a.long()]), infer={"enumerate": "parallel"})
        pyro.sample("C", dist.Bernoulli(Vindex(p_c)[b.long()]), obs=obs_c)


def toy_mixture_guide(obs_a: Tensor, obs_c: Tensor) -> None:
    positive = constraints.positive
    a = pyro.param("a", lambda: obs_a.new_tensor([2.0, 2.0]), constraint=positive)
    pyro.sample("p_A", dist.Beta(a[0], a[1]))
    b = pyro.param("b", lambda: obs_a.new_tensor([[2.0, 2.0], [2.0, 2.0]]), constraint=positive)
    pyro.sample("p_B", dist.Beta(b[:, 0], b[:, 1]).to_event(1))
    c = pyro.param("c", lambda: obs_a.new_tensor([[2.0, 2.0], [2.0, 2.0]]), constraint=positive)
    pyro.sample("p_C", dist.Beta(c[:, 0], c[:, 1]).to_event(1))


def toy_mixture() -> Example:
    with _seeded(15):
        a = torch.bernoulli(torch.full((40,), 0.3))
        b = torch.bernoulli(torch.where(a > 0, 0.8, 0.2))
        c = torch.bernoulli(torch.where(b > 0, 0.9, 0.1))
    dtype = torch.get_default_dtype()
    return Example(
        "toy_mixture", toy_mixture_model, toy_mixture_guide, (a.to(dtype), c.to(dtype)), 1, True, 40,
        "examples/toy_mixture_model_discrete_enumeration.py", pyro_loss_name="TraceEnum_ELBO",
    )  # fmt: skip


# --- eight schools, non-centred, hand-written guide (examples/eight_schools/svi.py) ------------


def eight_schools_nc_model(y: Tensor, sigma: Tensor) -> None:
    with pyro.plate("data", len(y)):
        eta = pyro.sample("eta", dist.Normal(torch.zeros_like(y), 1.0))
        mu = pyro.sample("mu", dist.Normal(y.new_zeros(1), 10.0))
        tau = pyro.sample("tau", dist.HalfCauchy(25.0 * y.new_ones(1)))
        pyro.sample("obs", dist.Normal(mu + tau * eta, sigma), obs=y)


def eight_schools_nc_guide(y: Tensor, sigma: Tensor) -> None:
    positive = constraints.positive
    j = len(y)
    loc_eta = pyro.param("loc_eta", lambda: torch.randn(j, dtype=y.dtype))
    scale_eta = pyro.param("scale_eta", lambda: 0.1 * torch.rand(j, dtype=y.dtype) + 0.01, constraint=positive)
    loc_mu = pyro.param("loc_mu", lambda: torch.randn(1, dtype=y.dtype))
    scale_mu = pyro.param("scale_mu", lambda: 0.1 * torch.rand(1, dtype=y.dtype) + 0.01, constraint=positive)
    loc_logtau = pyro.param("loc_logtau", lambda: torch.randn(1, dtype=y.dtype))
    scale_logtau = pyro.param("scale_logtau", lambda: 0.1 * torch.rand(1, dtype=y.dtype) + 0.01, constraint=positive)
    with pyro.plate("data", j):
        pyro.sample("eta", dist.Normal(loc_eta, scale_eta))
        pyro.sample("mu", dist.Normal(loc_mu, scale_mu))
        pyro.sample(
            "tau", dist.TransformedDistribution(dist.Normal(loc_logtau, scale_logtau), [dist.transforms.ExpTransform()])
        )


def eight_schools_svi() -> Example:
    from pyro_models import _eight_schools

    return Example(
        "eight_schools_svi", eight_schools_nc_model, eight_schools_nc_guide, _eight_schools(), 1, False, 8,
        "examples/eight_schools/svi.py",
    )  # fmt: skip


# --- minipyro (examples/minipyro.py) ------------------------------------------------------------


def minipyro_model(data: Tensor) -> None:
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(data), dim=-1):
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=data)


def minipyro_guide(data: Tensor) -> None:
    guide_loc = pyro.param("guide_loc", lambda: data.new_tensor(0.0))
    guide_scale = pyro.param("guide_scale_log", lambda: data.new_tensor(0.0)).exp()
    pyro.sample("loc", dist.Normal(guide_loc, guide_scale))


def minipyro() -> Example:
    with _seeded(16):
        data = (3.0 + torch.randn(100)).to(torch.get_default_dtype())
    return Example("minipyro", minipyro_model, minipyro_guide, (data,), 1, False, 100, "examples/minipyro.py")


# --- mixed HMM (examples/mixed_hmm, continuous group random effect) ------------------------------


class MixedHMM:
    """Animal movement: a continuous group random effect eps_g on the transition logits, a hidden
    behavioural state per step (enumerated, ``pyro.markov``) and Gamma step lengths; the guide is
    mean-field on eps_g (``guide_generic``)."""

    def __init__(self, states: int = 2, groups: int = 2) -> None:
        self.states, self.groups = states, groups

    def model(self, steps: Tensor) -> None:
        s, (g, i, t_max) = self.states, steps.shape
        transition = pyro.param("transition_logits", lambda: steps.new_zeros(s, s))
        rate = pyro.param("step_rate", lambda: steps.new_tensor([2.0, 0.5][:s]), constraint=constraints.positive)
        shape = pyro.param("step_shape", lambda: steps.new_ones(s), constraint=constraints.positive)
        with pyro.plate("group", g, dim=-1):
            eps_g = pyro.sample("eps_g", dist.Normal(steps.new_zeros(s * s), 1.0).to_event(1))
            logits = transition + eps_g.view(eps_g.shape[:-1] + (s, s))
            with pyro.plate("individual", i, dim=-2):
                y: Tensor | int = 0
                for t in pyro.markov(range(t_max)):
                    step_logits = Vindex(logits)[..., y, :] if t > 0 else logits[..., 0, :]
                    y = pyro.sample(f"y_{t}", dist.Categorical(logits=step_logits), infer={"enumerate": "parallel"})
                    pyro.sample(f"step_{t}", dist.Gamma(Vindex(shape)[y], Vindex(rate)[y]), obs=steps[..., t].T)

    def guide(self, steps: Tensor) -> None:
        s, g = self.states, steps.shape[0]
        loc = pyro.param("loc_group", lambda: steps.new_zeros(s * s))
        scale = pyro.param("scale_group", lambda: steps.new_ones(s * s), constraint=constraints.positive)
        with pyro.plate("group", g, dim=-1):
            pyro.sample("eps_g", dist.Normal(loc, scale).to_event(1))


def mixed_hmm() -> Example:
    with _seeded(17):
        steps = dist.Gamma(torch.tensor(1.0), torch.tensor(1.0)).sample((2, 3, 6)) + 0.01  # [group, individual, t]
    net = MixedHMM()
    return Example(
        "mixed_hmm", net.model, net.guide, (steps.to(torch.get_default_dtype()),), 2, True, 2,
        "examples/mixed_hmm/experiment.py", pyro_loss_name="TraceEnum_ELBO",
    )  # fmt: skip


# --- NeuTra (examples/neutra.py): banana-shaped target, flow guide -------------------------------


class BananaShaped(dist.TorchDistribution):
    """x2 | x1 ~ N(b (x1^2 - a), 1), x1 ~ N(0, a) rotated by a correlation ``rho`` (the example's
    density up to the transform)."""

    support = constraints.real_vector
    arg_constraints: dict[str, constraints.Constraint] = {}

    def __init__(self, a: float, b: float, rho: float = 0.9) -> None:
        self.a, self.b, self.rho = a, b, rho
        self.mvn = dist.MultivariateNormal(torch.zeros(2), torch.tensor([[1.0, rho], [rho, 1.0]]))
        super().__init__(event_shape=torch.Size([2]))

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        u = self.mvn.sample(torch.Size(sample_shape))
        x1 = self.a * u[..., 0]
        return torch.stack([x1, u[..., 1] / self.a + self.b * (x1.pow(2) + self.a**2)], -1)

    def log_prob(self, x: Tensor) -> Tensor:
        x1 = x[..., 0] / self.a
        x2 = (x[..., 1] - self.b * (x[..., 0].pow(2) + self.a**2)) * self.a
        mvn = dist.MultivariateNormal(x.new_zeros(2), x.new_tensor([[1.0, self.rho], [self.rho, 1.0]]))
        return mvn.log_prob(torch.stack([x1, x2], -1))


def neutra_model(a: float, b: float) -> None:
    pyro.sample("x", BananaShaped(a, b))


def neutra() -> Example:
    from pyro.distributions.transforms import block_autoregressive, iterated

    with _seeded(18):
        guide = AutoNormalizingFlow(neutra_model, lambda dim: iterated(2, block_autoregressive, dim))
    return Example("neutra", neutra_model, guide, (1.15, 1.0), 0, False, 1, "examples/neutra.py")


# --- sparse regression (examples/sparse_regression.py): SKIM kernel, MAP with AutoDelta ----------


def sparse_regression_model(x: Tensor, y: Tensor) -> None:
    n, p = x.shape
    expected, c = 2.0, 1.0
    sigma = pyro.sample("sigma", dist.HalfNormal(3.0))
    phi = sigma * (expected / math.sqrt(n)) / (p - expected)
    eta1 = pyro.sample("eta1", dist.HalfCauchy(phi))
    msq = pyro.sample("msq", dist.InverseGamma(x.new_tensor(3.0), 1.0))
    xisq = pyro.sample("xisq", dist.InverseGamma(x.new_tensor(2.0), 1.0))
    eta2 = eta1.pow(2) * xisq.sqrt() / msq
    lam = pyro.sample("lambda", dist.HalfCauchy(x.new_ones(p)).to_event(1))
    kappa = msq.sqrt() * lam / (msq + (eta1 * lam).pow(2)).sqrt()
    kx = kappa * x
    eta1sq, eta2sq = eta1.pow(2), eta2.pow(2)
    dot = kx @ kx.T
    kernel = (
        0.5 * eta2sq * (1.0 + dot).pow(2)
        - 0.5 * eta2sq * (kx.pow(2) @ kx.pow(2).T)
        + (eta1sq - eta2sq) * dot
        + (c**2 - 0.5 * eta2sq)
    )
    kernel = kernel + (sigma.pow(2) + 1e-4) * torch.eye(n, dtype=x.dtype)
    pyro.sample("Y", dist.MultivariateNormal(x.new_zeros(n), covariance_matrix=kernel), obs=y)


def sparse_regression() -> Example:
    with _seeded(19):
        x = torch.randn(20, 4)
        y = x[:, 0] - 0.5 * x[:, 1] * x[:, 0] + 0.1 * torch.randn(20)
    dtype = torch.get_default_dtype()
    guide = AutoDelta(sparse_regression_model, init_loc_fn=pyro.infer.autoguide.init_to_median)
    return Example(
        "sparse_regression", sparse_regression_model, guide, (x.to(dtype), y.to(dtype)), 0, False, 20,
        "examples/sparse_regression.py",
    )  # fmt: skip


# --- svi_torch / svi_lightning / svi_horovod: PyroModule regression, explicitly subsampled -------


class SubsampledRegression(PyroModule):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.coeff = PyroSample(dist.Normal(0.0, 1.0))
        self.bias = PyroSample(dist.Normal(0.0, 1.0))
        self.scale = PyroSample(dist.LogNormal(0.0, 1.0))

    def forward(self, covariates: Tensor, data: Tensor) -> Tensor:
        with pyro.plate("data", self.size, len(covariates)):
            loc = self.bias + self.coeff * covariates
            return pyro.sample("obs", dist.Normal(loc, self.scale), obs=data)


def svi_torch() -> Example:
    with _seeded(20):
        covariates = torch.randn(100)
        data = 3.0 + 2.0 * covariates + 0.5 * torch.randn(100)
        model = SubsampledRegression(100)
        guide = AutoNormal(model)
    dtype = torch.get_default_dtype()
    return Example(
        "svi_torch", model, guide, (covariates[:20].to(dtype), data[:20].to(dtype)), 1, False, 100,
        "examples/svi_torch.py (svi_lightning.py, svi_horovod.py: the same model)", subsampled=True,
        full_args=(covariates.to(dtype), data.to(dtype)),
    )  # fmt: skip


# --- autoname (examples/contrib/autoname/scoping_mixture.py) -------------------------------------


@pyro.contrib.autoname.scope(prefix="local")
def _local_model(locs: Tensor, data: Tensor) -> None:
    with pyro.plate("data", len(data)):
        z = pyro.sample("z", dist.Categorical(data.new_ones(len(locs)) / len(locs)))
        pyro.sample("x", dist.Normal(locs[z], 1.0), obs=data)


@pyro.contrib.autoname.scope(prefix="global")
def _global_model(k: int, dtype: torch.dtype) -> Tensor:
    with pyro.plate("components", k):
        return pyro.sample("locs", dist.Normal(torch.zeros((), dtype=dtype), 10.0))


@config_enumerate
def scoping_mixture_model(data: Tensor) -> None:
    _local_model(_global_model(2, data.dtype), data)


def scoping_mixture() -> Example:
    with _seeded(21):
        data = torch.cat([torch.randn(10) - 3.0, torch.randn(10) + 3.0]).to(torch.get_default_dtype())
    guide = AutoNormal(poutine.block(scoping_mixture_model, expose=["global/locs"]))
    return Example(
        "scoping_mixture", scoping_mixture_model, guide, (data,), 1, True, 20,
        "examples/contrib/autoname/scoping_mixture.py", pyro_loss_name="TraceEnum_ELBO",
    )  # fmt: skip


# --- sv-DKL (examples/contrib/gp/sv-dkl.py): variational sparse GP with a deep kernel -----------


def sv_dkl() -> Example:
    dtype = torch.get_default_dtype()
    with _seeded(22):
        x = torch.randn(40, 6, dtype=dtype)
        labels = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
        features = _mlp(6, 8, 4)
        kernel = gp.kernels.Warping(
            gp.kernels.RBF(input_dim=4, lengthscale=torch.ones(4, dtype=dtype)), iwarping_fn=features
        )
        likelihood = gp.likelihoods.MultiClass(num_classes=3)
        latent_shape = torch.Size([3])
        module = gp.models.VariationalSparseGP(
            x, labels.to(dtype), kernel, Xu=torch.randn(6, 6, dtype=dtype), likelihood=likelihood,
            latent_shape=latent_shape, num_data=40, whiten=True, jitter=1e-3,
        )  # fmt: skip
    return Example(
        "sv_dkl", module.model, module.guide, (), 1, False, 40, "examples/contrib/gp/sv-dkl.py",
        pyro_loss_name="TraceMeanField_ELBO",
    )  # fmt: skip


# --- GP Bayesian optimisation (examples/contrib/oed/gp_bayes_opt.py): GPRegression fit by SVI -----


def gp_regression() -> Example:
    dtype = torch.get_default_dtype()
    with _seeded(23):
        x = torch.linspace(-2, 2, 12, dtype=dtype)
        y = torch.sin(2 * x) + 0.1 * torch.randn(12, dtype=dtype)
        kernel = gp.kernels.Matern52(input_dim=1)
        kernel.lengthscale = PyroSample(dist.LogNormal(torch.tensor(0.0, dtype=dtype), 1.0))
        gpr = gp.models.GPRegression(x, y, kernel, noise=torch.tensor(0.1, dtype=dtype), jitter=1e-3)
        gpr.kernel.autoguide("lengthscale", dist.Normal)
    return Example("gp_bayes_opt", gpr.model, gpr.guide, (), 0, False, 12, "examples/contrib/oed/gp_bayes_opt.py")


# --- OED A/B test (examples/contrib/oed/ab_test.py): zero-mean, unit-noise linear model -----------


def ab_test_model(design: Tensor, y: Tensor) -> None:
    with pyro.plate("designs", design.shape[0]):
        w = pyro.sample("w", dist.Normal(design.new_zeros(2), design.new_tensor([10.0, 2.5])).to_event(1))
        pyro.sample("y", dist.Normal((design * w.unsqueeze(-2)).sum(-1), 1.0).to_event(1), obs=y)


def ab_test_guide(design: Tensor, y: Tensor) -> None:
    # the posterior's form: a linear map of y, as the example's guide
    weights = pyro.param("regressor", lambda: design.new_zeros(2, y.shape[-1]))
    scale_tril = pyro.param(
        "scale_tril", lambda: torch.eye(2, dtype=design.dtype), constraint=constraints.lower_cholesky
    )
    with pyro.plate("designs", design.shape[0]):
        pyro.sample("w", dist.MultivariateNormal((weights * y.unsqueeze(-2)).sum(-1), scale_tril=scale_tril))


def ab_test() -> Example:
    dtype = torch.get_default_dtype()
    with _seeded(24):
        design = torch.zeros(5, 10, 2, dtype=dtype)  # five designs: k of 10 participants in group A
        for i, k in enumerate((2, 4, 5, 6, 8)):
            design[i, :, 0] = 1.0
            design[i, :k, 1] = 1.0
        y = (design * torch.tensor([1.0, 0.5], dtype=dtype)).sum(-1) + torch.randn(5, 10, dtype=dtype)
    return Example("ab_test", ab_test_model, ab_test_guide, (design, y), 1, False, 5, "examples/contrib/oed/ab_test.py")


# --- CEVAE (examples/contrib/cevae/synthetic.py) ------------------------------------------------


def cevae() -> Example:
    from pyro.contrib.cevae import CEVAE

    dtype = torch.get_default_dtype()
    with _seeded(25):
        z = torch.bernoulli(torch.full((40,), 0.5, dtype=dtype))
        x = torch.randn(40, 3, dtype=dtype) + z.unsqueeze(-1)
        t = torch.bernoulli(0.75 * z + 0.25 * (1 - z))
        y = torch.bernoulli(torch.sigmoid(3 * (z + 2 * (2 * t - 1))))
        net = CEVAE(feature_dim=3, latent_dim=2, hidden_dim=8, num_layers=2).to(dtype)
    return Example(
        "cevae", net.model, net.guide, (x, t, y), 1, False, 40,
        "examples/contrib/cevae/synthetic.py (Pyro trains it with TraceCausalEffect_ELBO)",
    )  # fmt: skip


# --- forecasting (examples/contrib/forecast/bart.py; tutorials "Forecasting I-III") --------------


def forecast() -> Example:
    from pyro.contrib.forecast import ForecastingModel

    class LocalLevel(ForecastingModel):  # type: ignore[misc]
        """Bias + weekly regression + a local-level random walk and Student-t noise (bart.py's facts)."""

        def model(self, zero_data: Tensor, covariates: Tensor) -> None:
            data_dim = zero_data.size(-1)
            bias = pyro.sample("bias", dist.Normal(zero_data.new_zeros(()), 10.0).expand([data_dim]).to_event(1))
            weight = pyro.sample(
                "weight", dist.Normal(zero_data.new_zeros(()), 0.1).expand([covariates.size(-1), data_dim]).to_event(2)
            )
            drift_scale = pyro.sample(
                "drift_scale", dist.LogNormal(zero_data.new_tensor(-3.0), 1.0).expand([data_dim]).to_event(1)
            )
            with self.time_plate:
                drift = pyro.sample("drift", dist.Normal(zero_data, drift_scale).to_event(1))
            motion = drift.cumsum(-2)
            prediction = motion + bias + covariates @ weight
            noise_scale = pyro.sample(
                "noise_scale", dist.LogNormal(zero_data.new_tensor(-1.0), 1.0).expand([data_dim]).to_event(1)
            )
            self.predict(dist.Normal(0.0, noise_scale), prediction)

    dtype = torch.get_default_dtype()
    with _seeded(26):
        t = 40
        covariates = nn.functional.one_hot(torch.arange(t) % 7, 7).to(dtype)
        data = (torch.randn(t, 1).cumsum(0) * 0.3 + covariates[:, :1] + 5.0).to(dtype)
        forecaster_model = LocalLevel()
        guide = AutoNormal(forecaster_model)
    return Example(
        "forecast", forecaster_model, guide, (data, covariates), 1, False, t,
        "examples/contrib/forecast/bart.py (Forecaster: SVI with Trace_ELBO)",
    )  # fmt: skip


# --- MuE (examples/contrib/mue/ProfileHMM.py, FactorMuE.py) -------------------------------------


def _mue_data(seed: int) -> Tensor:
    with _seeded(seed):
        seqs = torch.randint(0, 4, (6, 5))
    dtype = torch.get_default_dtype()
    return nn.functional.one_hot(seqs, 4).to(dtype)


def profile_hmm() -> Example:
    from pyro.contrib.mue.models import ProfileHMM

    dtype = torch.get_default_dtype()
    with _seeded(27):
        net = ProfileHMM(latent_seq_length=4, alphabet_length=4)
    seqs = _mue_data(27)
    return Example(
        "profile_hmm", net.model, net.guide, (seqs.to(dtype), 1.0), 1, False, 6,
        "examples/contrib/mue/ProfileHMM.py",
    )  # fmt: skip


def factor_mue() -> Example:
    from pyro.contrib.mue.models import FactorMuE

    with _seeded(28):
        net = FactorMuE(data_length=5, alphabet_length=4, z_dim=2, batch_size=6, latent_seq_length=4)
    seqs = _mue_data(28)
    return Example(
        "factor_mue", net.model, net.guide, (seqs, 1.0, 1.0), 1, False, 6,
        "examples/contrib/mue/FactorMuE.py",
    )  # fmt: skip


# --- tutorials --------------------------------------------------------------------------------------


def _coin_data() -> Tensor:
    return torch.tensor([1.0] * 6 + [0.0] * 4, dtype=torch.get_default_dtype())


def coin_model(data: Tensor) -> None:
    f = pyro.sample("latent_fairness", dist.Beta(data.new_tensor(10.0), data.new_tensor(10.0)))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Bernoulli(f), obs=data)


def coin_guide(data: Tensor) -> None:
    alpha_q = pyro.param("alpha_q", lambda: data.new_tensor(15.0), constraint=constraints.positive)
    beta_q = pyro.param("beta_q", lambda: data.new_tensor(15.0), constraint=constraints.positive)
    pyro.sample("latent_fairness", dist.Beta(alpha_q, beta_q))


def svi_part_i() -> Example:
    return Example("svi_part_i", coin_model, coin_guide, (_coin_data(),), 1, False, 10, "tutorial: SVI part I")


def coin_guide_nonreparam(data: Tensor) -> None:
    alpha_q = pyro.param("alpha_q", lambda: data.new_tensor(15.0), constraint=constraints.positive)
    beta_q = pyro.param("beta_q", lambda: data.new_tensor(15.0), constraint=constraints.positive)
    baseline = {"use_decaying_avg_baseline": True, "baseline_beta": 0.9}
    pyro.sample("latent_fairness", NonreparameterizedBeta(alpha_q, beta_q), infer={"baseline": baseline})


def svi_part_iii() -> Example:
    return Example(
        "svi_part_iii", coin_model, coin_guide_nonreparam, (_coin_data(),), 1, False, 10,
        "tutorial: SVI part III (decaying-average baseline)", pyro_loss_name="TraceGraph_ELBO",
    )  # fmt: skip


def scale_model(guess: Tensor, measurement: Tensor) -> None:
    weight = pyro.sample("weight", dist.Normal(guess, 1.0))
    pyro.sample("measurement", dist.Normal(weight, 0.75), obs=measurement)


def scale_guide(guess: Tensor, measurement: Tensor) -> None:
    a = pyro.param("a", lambda: guess.clone())
    b = pyro.param("b", lambda: torch.ones_like(guess), constraint=constraints.positive)
    pyro.sample("weight", dist.Normal(a, b))


def intro_part_ii() -> Example:
    dtype = torch.get_default_dtype()
    args = (torch.tensor(8.5, dtype=dtype), torch.tensor(9.5, dtype=dtype))
    return Example("intro_part_ii", scale_model, scale_guide, args, 0, False, 1, "tutorial: introduction part II")


def rugged_model(is_africa: Tensor, ruggedness: Tensor, log_gdp: Tensor) -> None:
    a = pyro.sample("a", dist.Normal(0.0, 10.0))
    b_a = pyro.sample("bA", dist.Normal(0.0, 1.0))
    b_r = pyro.sample("bR", dist.Normal(0.0, 1.0))
    b_ar = pyro.sample("bAR", dist.Normal(0.0, 1.0))
    sigma = pyro.sample("sigma", dist.Uniform(0.0, 10.0))
    mean = a + b_a * is_africa + b_r * ruggedness + b_ar * is_africa * ruggedness
    with pyro.plate("data", len(ruggedness)):
        pyro.sample("obs", dist.Normal(mean, sigma), obs=log_gdp)


def rugged_guide(is_africa: Tensor, ruggedness: Tensor, log_gdp: Tensor) -> None:
    positive = constraints.positive
    a_loc = pyro.param("a_loc", lambda: log_gdp.new_tensor(0.0))
    a_scale = pyro.param("a_scale", lambda: log_gdp.new_tensor(1.0), constraint=positive)
    sigma_loc = pyro.param("sigma_loc", lambda: log_gdp.new_tensor(0.0))
    w_loc = pyro.param("weights_loc", lambda: torch.randn(3, dtype=log_gdp.dtype))
    w_scale = pyro.param("weights_scale", lambda: log_gdp.new_ones(3), constraint=positive)
    pyro.sample("a", dist.Normal(a_loc, a_scale))
    pyro.sample("bA", dist.Normal(w_loc[0], w_scale[0]))
    pyro.sample("bR", dist.Normal(w_loc[1], w_scale[1]))
    pyro.sample("bAR", dist.Normal(w_loc[2], w_scale[2]))
    pyro.sample("sigma", dist.LogNormal(sigma_loc, log_gdp.new_tensor(0.05)))


def intro_long() -> Example:
    from pyro_models import _rugged_like

    with _seeded(29):
        x, y = _rugged_like()
    dtype = torch.get_default_dtype()
    args = (x[:, 0].to(dtype), x[:, 1].to(dtype), y.to(dtype))
    return Example("intro_long", rugged_model, rugged_guide, args, 1, False, len(y), "tutorial: introduction (long)")


T_DP = 4


def _mix_weights(beta: Tensor) -> Tensor:
    cumprod = (1 - beta).cumprod(-1)
    return nn.functional.pad(beta, (0, 1), value=1) * nn.functional.pad(cumprod, (1, 0), value=1)


def dp_model(data: Tensor) -> None:
    with pyro.plate("beta_plate", T_DP - 1):
        beta = pyro.sample("beta", dist.Beta(data.new_tensor(1.0), 1.5))
    with pyro.plate("mu_plate", T_DP):
        mu = pyro.sample("mu", dist.MultivariateNormal(data.new_zeros(2), 5 * torch.eye(2, dtype=data.dtype)))
    with pyro.plate("data", len(data)):
        z = pyro.sample("z", dist.Categorical(_mix_weights(beta)))
        pyro.sample("obs", dist.MultivariateNormal(mu[z], torch.eye(2, dtype=data.dtype)), obs=data)


def dp_guide(data: Tensor) -> None:
    n, dtype = len(data), data.dtype
    kappa = pyro.param(
        "kappa", lambda: dist.Uniform(0.0, 2.0).sample([T_DP - 1]).to(dtype) + 0.1, constraint=constraints.positive
    )
    tau = pyro.param("tau", lambda: dist.MultivariateNormal(torch.zeros(2), 3 * torch.eye(2)).sample([T_DP]).to(dtype))
    phi = pyro.param(
        "phi", lambda: dist.Dirichlet(torch.ones(T_DP)).sample([n]).to(dtype), constraint=constraints.simplex
    )
    with pyro.plate("beta_plate", T_DP - 1):
        pyro.sample("beta", dist.Beta(torch.ones(T_DP - 1, dtype=dtype), kappa))
    with pyro.plate("mu_plate", T_DP):
        pyro.sample("mu", dist.MultivariateNormal(tau, torch.eye(2, dtype=dtype)))
    with pyro.plate("data", n):
        pyro.sample("z", dist.Categorical(phi))


def dp_mixture() -> Example:
    with _seeded(30):
        data = torch.cat([torch.randn(10, 2) - 4.0, torch.randn(10, 2) + 4.0]).to(torch.get_default_dtype())
    return Example("dp_mixture", dp_model, dp_guide, (data,), 1, False, 20, "tutorial: Dirichlet process mixture")


class ProdLDA(nn.Module):
    """Logistic-normal topic proportions, a BatchNorm'd product-of-experts decoder (``affine=False``),
    a BatchNorm'd encoder; ``TraceMeanField_ELBO``. Dropout is zero so a loss is a function of the
    draws (the tutorial uses 0.2)."""

    def __init__(self, vocab: int = 12, topics: int = 3, hidden: int = 16) -> None:
        super().__init__()
        self.topics = topics
        self.enc = _mlp(vocab, hidden, hidden)
        self.fcmu, self.fclv = nn.Linear(hidden, topics), nn.Linear(hidden, topics)
        self.bnmu, self.bnlv = nn.BatchNorm1d(topics, affine=False), nn.BatchNorm1d(topics, affine=False)
        self.beta = nn.Linear(topics, vocab, bias=False)
        self.bn = nn.BatchNorm1d(vocab, affine=False)

    def decoder(self, theta: Tensor) -> Tensor:
        shape = theta.shape
        out = self.bn(self.beta(theta.reshape(-1, shape[-1])))
        return out.softmax(-1).reshape(shape[:-1] + out.shape[-1:])

    def model(self, docs: Tensor) -> None:
        pyro.module("decoder", nn.ModuleList([self.beta, self.bn]))
        with pyro.plate("documents", docs.shape[0]):
            logtheta = pyro.sample("logtheta", dist.Normal(docs.new_zeros(docs.shape[0], self.topics), 1.0).to_event(1))
            probs = self.decoder(logtheta.softmax(-1))
            total = int(docs.sum(-1).max())
            pyro.sample("obs", dist.Multinomial(total, probs), obs=docs)

    def guide(self, docs: Tensor) -> None:
        pyro.module("encoder", nn.ModuleList([self.enc, self.fcmu, self.fclv, self.bnmu, self.bnlv]))
        with pyro.plate("documents", docs.shape[0]):
            h = nn.functional.softplus(self.enc(docs))
            loc, logvar = self.bnmu(self.fcmu(h)), self.bnlv(self.fclv(h))
            pyro.sample("logtheta", dist.Normal(loc, (0.5 * logvar).exp()).to_event(1))


def prodlda() -> Example:
    from pyro_models import _lda_corpus

    with _seeded(31):
        words = _lda_corpus(24, 12, 3, 10)
        net = ProdLDA().to(torch.get_default_dtype())
    docs = nn.functional.one_hot(words, 12).sum(0).to(torch.get_default_dtype())
    return Example(
        "prodlda",
        net.model,
        net.guide,
        (docs,),
        1,
        False,
        24,
        "tutorial: ProdLDA",
        pyro_loss_name="TraceMeanField_ELBO",
    )


def tensor_shapes_model() -> None:
    """The tutorial's ``model1`` (no data), trained with itself as the guide."""
    pyro.sample("a", dist.Normal(0.0, 1.0))
    pyro.sample("b", dist.Normal(_float(2), 1.0).to_event(1))
    with pyro.plate("c_plate", 2):
        pyro.sample("c", dist.Normal(_float(2), 1.0))
    with pyro.plate("d_plate", 3):
        pyro.sample("d", dist.Normal(_float(3, 4, 5), 1.0).to_event(2))
    with pyro.plate("x_axis", 3, dim=-2), pyro.plate("y_axis", 2, dim=-3):
        pyro.sample("xy", dist.Normal(0.0, 1.0))
        pyro.sample("z", dist.Normal(0.0, 1.0).expand([5]).to_event(1))


def tensor_shapes() -> Example:
    return Example(
        "tensor_shapes", tensor_shapes_model, tensor_shapes_model, (), 3, False, 1, "tutorial: tensor shapes (model1)"
    )


@config_enumerate
def enumeration_model(data: Tensor) -> None:
    """The tutorial's dependent discrete chain x -> y with a plate and Vindex, locs learned by SVI."""
    p = pyro.param("p", lambda: torch.full((3, 3), 1.0 / 3, dtype=data.dtype), constraint=constraints.simplex)
    locs = pyro.sample("locs", dist.Normal(data.new_zeros(3), 5.0).to_event(1))
    x = pyro.sample("x", dist.Categorical(p[0]))
    with pyro.plate("data", len(data)):
        y = pyro.sample("y", dist.Categorical(Vindex(p)[x]))
        pyro.sample("obs", dist.Normal(Vindex(locs)[..., y], 1.0), obs=data)


def enumeration() -> Example:
    with _seeded(32):
        data = (torch.randint(0, 3, (15,)) * 3.0 + 0.5 * torch.randn(15)).to(torch.get_default_dtype())
    guide = AutoNormal(poutine.block(enumeration_model, expose=["locs"]))
    return Example(
        "enumeration", enumeration_model, guide, (data,), 1, True, 15, "tutorial: inference with discrete latents",
        pyro_loss_name="TraceEnum_ELBO",
    )  # fmt: skip


def easyguide_model(batch: Tensor) -> None:
    t_max, n = batch.shape
    drift = pyro.sample("drift", dist.LogNormal(batch.new_tensor(-1.0), 0.5))
    with pyro.plate("data", n):
        z: Tensor | float = 0.0
        for t in range(t_max):
            z = pyro.sample(f"state_{t}", dist.Normal(z, drift))
            pyro.sample(f"obs_{t}", dist.Bernoulli(logits=z), obs=batch[t])


def easyguide() -> Example:
    from pyro.contrib.easyguide import easy_guide

    @easy_guide(easyguide_model)
    def guide(self: Any, batch: Tensor) -> None:
        t_max, n = batch.shape
        drift_loc = pyro.param("drift_loc", lambda: batch.new_tensor(0.1), constraint=constraints.positive)
        pyro.sample("drift", dist.Delta(drift_loc))
        group = self.group(match="state_[0-9]*")
        cov_diag = pyro.param(
            "state_cov_diag", lambda: batch.new_full((n, t_max), 0.01), constraint=constraints.positive
        )
        cov_factor = pyro.param("state_cov_factor", lambda: batch.new_zeros(n, t_max, 2) + 0.01)
        loc = pyro.param("state_loc", lambda: batch.new_zeros(n, t_max))
        with self.plate("data", n):
            group.sample("states", dist.LowRankMultivariateNormal(loc, cov_factor, cov_diag))

    with _seeded(33):
        batch = torch.bernoulli(torch.full((5, 12), 0.5)).to(torch.get_default_dtype())
    return Example("easyguide", easyguide_model, guide, (batch,), 1, False, 12, "tutorial: EasyGuide")


def mle_map() -> Example:
    guide = AutoDelta(coin_model)
    return Example("mle_map", coin_model, guide, (_coin_data(),), 1, False, 10, "tutorial: MLE and MAP (MAP part)")


def stable_model(r: Tensor) -> None:
    stability = pyro.sample("stability", dist.Uniform(r.new_tensor(1.0), 2.0))
    skew = pyro.sample("skew", dist.Uniform(r.new_tensor(-1.0), 1.0))
    scale = pyro.sample("scale", dist.LogNormal(r.new_tensor(-2.0), 1.0))
    with pyro.plate("data", len(r)):
        pyro.sample("r", dist.Stable(stability, skew, scale, 0.0), obs=r)


def stable() -> Example:
    from pyro.infer.reparam import StableReparam

    with _seeded(34):
        r = (0.1 * dist.StudentT(3.0).sample((30,))).to(torch.get_default_dtype())
    model = poutine.reparam(stable_model, {"r": StableReparam()})
    return Example("stable", model, AutoDiagonalNormal(model), (r,), 1, False, 30, "tutorial: stable distributions")


def predictive_deterministic_model(x: Tensor, y: Tensor) -> None:
    a = pyro.sample("a", dist.Normal(0.0, 10.0))
    b = pyro.sample("b", dist.Normal(0.0, 10.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(5.0))
    mean = pyro.deterministic("mean", a + b * x)
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(mean, sigma), obs=y)


def predictive_deterministic() -> Example:
    with _seeded(35):
        x = torch.linspace(0, 1, 20)
        y = 1.0 + 2.0 * x + 0.3 * torch.randn(20)
    dtype = torch.get_default_dtype()
    model = predictive_deterministic_model
    return Example(
        "predictive_deterministic", model, AutoNormal(model), (x.to(dtype), y.to(dtype)), 1, False, 20,
        "tutorial: predictive with deterministic sites",
    )  # fmt: skip


class FlowPriorVAE(nn.Module):
    """A VAE whose prior is a learned normalizing flow (an affine autoregressive transform of a
    standard normal, registered with ``pyro.module``); the tutorial uses zuko's MAF."""

    def __init__(self, x_dim: int = 64, z_dim: int = 3, hidden: int = 16) -> None:
        super().__init__()
        from pyro.distributions.transforms import affine_autoregressive

        self.z_dim = z_dim
        self.flow = affine_autoregressive(z_dim, hidden_dims=[hidden])
        self.encoder = _mlp(x_dim, hidden, 2 * z_dim)
        self.decoder = _mlp(z_dim, hidden, x_dim, out=nn.Sigmoid())

    def model(self, x: Tensor) -> None:
        pyro.module("prior", self.flow)
        pyro.module("decoder", self.decoder)
        base = dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1)
        with pyro.plate("batch", len(x)):
            z = pyro.sample("z", dist.TransformedDistribution(base, [self.flow]))
            pyro.sample("x", dist.Bernoulli(self.decoder(z), validate_args=False).to_event(1), obs=x)

    def guide(self, x: Tensor) -> None:
        pyro.module("encoder", self.encoder)
        with pyro.plate("batch", len(x)):
            loc, log_scale = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def vae_flow_prior() -> Example:
    with _seeded(36):
        net = FlowPriorVAE().to(torch.get_default_dtype())
    return Example(
        "vae_flow_prior", net.model, net.guide, (_binary_digits(32),), 1, False, 32, "tutorial: VAE with a flow prior"
    )


def working_memory_model(lengths: Tensor) -> Tensor:
    """Digit-span test: a participant's ability theta, a logistic response per round (``plate_stack``
    over participants, rounds as the event)."""
    with pyro.plate_stack("plate", lengths.shape[:-1]):
        theta = pyro.sample("theta", dist.Normal(lengths.new_tensor(7.0), 2.0))
        logit_p = 1.0 * (theta.unsqueeze(-1) - lengths)
        return pyro.sample("y", dist.Bernoulli(logits=logit_p).to_event(1))


def working_memory_guide(lengths: Tensor) -> None:
    loc = pyro.param("posterior_mean", lambda: lengths.new_full(lengths.shape[:-1], 7.0))
    scale = pyro.param(
        "posterior_sd", lambda: lengths.new_full(lengths.shape[:-1], 2.0), constraint=constraints.positive
    )
    with pyro.plate_stack("plate", lengths.shape[:-1]):
        pyro.sample("theta", dist.Normal(loc, scale))


def working_memory() -> Example:
    dtype = torch.get_default_dtype()
    with _seeded(37):
        lengths = torch.tensor([[5.0, 7.0, 9.0, 6.0, 8.0]] * 4, dtype=dtype)  # four participants, five rounds
        y = (torch.rand(4, 5) < torch.sigmoid(torch.tensor([[2.0], [0.0], [1.0], [-1.0]]) + 7 - lengths)).to(dtype)
    model = pyro.condition(working_memory_model, data={"y": y})
    return Example(
        "working_memory", model, working_memory_guide, (lengths,), 1, False, 4,
        "tutorial: designing adaptive experiments (working memory)",
    )  # fmt: skip


def workflow_model(group: Tensor, y: Tensor) -> None:
    """Varying intercepts per group, written centred; ``LocScaleReparam`` (the tutorial's
    ``AutoReparam``) decentres them."""
    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 5.0))
    sigma_group = pyro.sample("sigma_group", dist.HalfNormal(y.new_tensor(2.0)))
    sigma = pyro.sample("sigma", dist.HalfNormal(y.new_tensor(2.0)))
    with pyro.plate("groups", int(group.max()) + 1):
        alpha = pyro.sample("alpha", dist.Normal(mu, sigma_group))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Normal(alpha[..., group], sigma), obs=y)


def workflow() -> Example:
    from pyro.infer.reparam import LocScaleReparam

    dtype = torch.get_default_dtype()
    with _seeded(38):
        group = torch.arange(24) % 4
        y = (torch.randn(4)[group] + 0.5 * torch.randn(24)).to(dtype)
    model = poutine.reparam(workflow_model, {"alpha": LocScaleReparam(centered=0.0)})
    guide = AutoNormal(model, init_scale=0.01)
    return Example("workflow", model, guide, (group, y), 1, False, 24, "tutorial: Bayesian workflow (reparameterized)")


def logistic_growth_model(counts: Tensor) -> None:
    """Two lineages growing linearly in logit space (plates over lineages and time), multinomial
    counts per time step; the tutorial's shape ``assert`` kept (it holds for one draw at a time)."""
    t_max, lineages = counts.shape
    with pyro.plate("lineages", lineages, dim=-1):
        rate = pyro.sample("rate", dist.Normal(counts.new_tensor(0.0), 1.0))
        init = pyro.sample("init", dist.Normal(counts.new_tensor(0.0), 1.0))
    time = torch.arange(float(t_max), dtype=counts.dtype) * 7.0 / 5.5
    probs = torch.softmax(init + rate * time[:, None], dim=-1)
    assert probs.shape == (t_max, lineages)
    with pyro.plate("time", t_max, dim=-2):
        pyro.sample("obs", dist.Multinomial(probs=probs.unsqueeze(-2), validate_args=False), obs=counts.unsqueeze(-2))


def logistic_growth() -> Example:
    with _seeded(39):
        share = torch.sigmoid(torch.linspace(-3, 3, 12))
        counts = torch.stack([dist.Binomial(50, share).sample(), torch.zeros(12)], -1)
        counts[:, 1] = 50 - counts[:, 0]
    model = logistic_growth_model
    return Example(
        "logistic_growth", model, AutoNormal(model, init_scale=0.01), (counts.to(torch.get_default_dtype()),), 2,
        False, 12, "tutorial: logistic growth (basic_model)",
    )  # fmt: skip


#: name -> factory of a fresh example
EXAMPLES: dict[str, Callable[[], Example]] = {
    "vae": _from_zoo("vae", "vae", "Trace_ELBO", "examples/vae/vae.py (vae_comparison.py; tutorial VAE)"),
    "ss_vae_enum": ss_vae_enum,
    "ss_vae_sampled": ss_vae_sampled,
    "air": air,
    "cvae": cvae,
    "scanvi": scanvi,
    "dmm": _from_zoo("dmm", "dmm", "Trace_ELBO", "examples/dmm.py (tutorial: deep Markov model)"),
    "sparse_gamma_def": _from_zoo(
        "sparse_gamma_def", "sparse_gamma_def", "TraceMeanField_ELBO", "examples/sparse_gamma_def.py"
    ),
    "lda_enum": _from_zoo("lda_enum", "lda_enum", "TraceEnum_ELBO", "examples/lda.py (word topics enumerated)"),
    "lda_amortized": _from_zoo("lda_amortized", "lda_amortized", "Trace_ELBO", "examples/lda.py (amortized guide)"),
    "hmm": _from_zoo("hmm", "hmm_enum", "TraceEnum_ELBO", "examples/hmm.py (model_1)"),
    "cjs": cjs,
    "mixed_hmm": mixed_hmm,
    "toy_mixture": toy_mixture,
    "scoping_mixture": scoping_mixture,
    "eight_schools_svi": eight_schools_svi,
    "minipyro": minipyro,
    "neutra": neutra,
    "sparse_regression": sparse_regression,
    "svi_torch": svi_torch,
    "sv_dkl": sv_dkl,
    "gp_bayes_opt": gp_regression,
    "ab_test": ab_test,
    "cevae": cevae,
    "forecast": forecast,
    "profile_hmm": profile_hmm,
    "factor_mue": factor_mue,
    "svi_part_i": svi_part_i,
    "svi_part_iii": svi_part_iii,
    "intro_part_ii": intro_part_ii,
    "intro_long": intro_long,
    "bayes_regression": _from_zoo(
        "bayes_regression", "bayes_regression_diag", "Trace_ELBO", "tutorial: Bayesian regression part I"
    ),
    "bayes_regression_ii": _from_zoo(
        "bayes_regression_ii", "bayes_regression_mvn", "Trace_ELBO", "tutorial: Bayesian regression part II"
    ),
    "gmm": _from_zoo("gmm", "gmm_enum", "TraceEnum_ELBO", "tutorial: Gaussian mixture model"),
    "sparse_gp": _from_zoo("sparse_gp", "sparse_gp", "Trace_ELBO", "tutorial: Gaussian processes"),
    "flow_guide": _from_zoo("flow_guide", "iaf_guide", "Trace_ELBO", "tutorial: SVI with a normalizing-flow guide"),
    "dp_mixture": dp_mixture,
    "prodlda": prodlda,
    "tensor_shapes": tensor_shapes,
    "enumeration": enumeration,
    "easyguide": easyguide,
    "mle_map": mle_map,
    "stable": stable,
    "predictive_deterministic": predictive_deterministic,
    "vae_flow_prior": vae_flow_prior,
    "working_memory": working_memory,
    "workflow": workflow,
    "logistic_growth": logistic_growth,
}

#: Pyro examples and tutorials that are not rows of the table, and why
EXCLUDED: dict[str, str] = {
    "examples/baseball.py": "MCMC only (NUTS); the zoo of tests/pyro_models.py fits its models with SVI",
    "examples/eight_schools/mcmc.py": "MCMC only (its SVI twin is the row eight_schools_svi)",
    "examples/lkj.py": "MCMC only (NUTS)",
    "examples/sir_hmc.py": "MCMC only (HMC)",
    "examples/contrib/epidemiology/sir.py, regional.py": "CompartmentalModel.fit_svi builds its own relaxed "
    "model and guide inside the class; not written here",
    "examples/inclined_plane.py": "importance sampling, no SVI",
    "examples/smcfilter.py": "sequential Monte Carlo, no SVI",
    "examples/einsum.py": "tensor contraction benchmark, no inference",
    "examples/rsa/*.py": "exact enumeration by search (Search, HashingMarginal), no SVI",
    "examples/contrib/timeseries/gp_models.py": "maximum likelihood by log_prob and Adam, no SVI",
    "examples/contrib/funsor/hmm.py; tutorials contrib_funsor_intro_i/ii": "needs funsor (not installed); "
    "its models are examples/hmm.py's",
    "examples/contrib/autoname/mixture.py, tree_data.py": "the scoping_mixture row covers autoname's scopes",
    "tutorials svi_part_ii, svi_part_iv, jit, custom_objectives, boosting_bbvi, modules": "no new model "
    "(they reuse the coin, VAE and regression rows)",
    "tutorials ekf, tracking_1d": "not written here (contrib.tracking's EKF distribution; multi-object assignment)",
    "tutorial svi_flow_guide": "needs zuko (not installed); the flow_guide row is an SVI flow guide",
    "tutorials elections, RSA, epi_intro": "no SVI model of their own in the notebook's code "
    "(MCMC, search or no inference)",
}


def cli_model_file(name: str) -> str:
    """Source of a model file for ``pyro-elbo run FILE`` that serves example ``name``."""
    here = repr(str(Path(__file__).resolve().parent))
    return (
        f"import sys\nsys.path.insert(0, {here})\nfrom pyro_examples_models import EXAMPLES\n\n"
        f"_entry = EXAMPLES[{name!r}]()\nmodel, guide = _entry.model, _entry.guide\n\n\n"
        "def data():\n    return _entry.args\n\n\n"
        "def full_data():\n    return _entry.full_args or _entry.args\n"
    )
