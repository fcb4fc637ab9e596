"""A zoo of real Pyro models: small-data versions of Pyro's examples and tutorials, written the way
Pyro users write them (``pyro.module`` networks, ``PyroModule``/``PyroSample``, ``contrib.gp``,
autoguides, ``pyro.markov``, ``poutine.scale``, masks, subsampled plates, ``@config_enumerate``).

Each factory in :data:`ZOO` returns a fresh :class:`ZooEntry` (new networks and guides, seeded
weights, generated or bundled data in the current default dtype) without touching the global
random stream. Used by ``tests/test_real_models.py`` and ``benchmarks/real_models.py``; each model
takes well under a second per step on one CPU thread.

Sources (facts only; the code is written here): Pyro's ``examples/vae/vae.py``,
``examples/sparse_gamma_def.py``, ``examples/lda.py``, ``examples/dmm.py``, ``examples/hmm.py``,
``examples/baseball.py`` and the tutorials "Bayesian regression", "Gaussian processes" and
"Gaussian mixture model".
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pyro
import pyro.contrib.gp as gp
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import block_autoregressive, iterated
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, config_enumerate
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormal,
    AutoNormalizingFlow,
)
from pyro.nn import PyroModule, PyroSample
from torch import Tensor, nn

#: Efron & Morris (1975): hits of 18 players in their first 45 at-bats of the 1970 season
BASEBALL_HITS = [18, 17, 16, 15, 14, 14, 13, 12, 11, 11, 10, 10, 10, 10, 10, 9, 8, 7]
#: standard errors of the eight schools' effects (Rubin 1981, Table 2)
EIGHT_SCHOOLS_SIGMA = [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]


@dataclass
class ZooEntry:
    """One model/guide pair and its arguments.

    Attributes:
        name: key in :data:`ZOO`.
        model, guide: the Pyro program as a user would pass it to ``SVI``.
        args, kwargs: the model's arguments (``kwargs`` is empty for every entry: the CLI passes none).
        max_plate_nesting: plate dims the model uses.
        enumerated: the model has sites summed out by enumeration (``TraceEnum_ELBO``).
        data_size: number of data points (the outermost data plate).
        subsampled: a data plate is subsampled (``subsample_size``).
        full_args: the arguments without subsampling (for ``kl_gap`` and ArviZ export, which need
            every data point); ``args`` when nothing is subsampled.
        source: the Pyro example or tutorial it follows.
    """

    name: str
    model: Callable[..., Any]
    guide: Callable[..., Any]
    args: tuple[Any, ...]
    max_plate_nesting: int
    enumerated: bool
    data_size: int
    source: str
    subsampled: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)
    full_args: tuple[Any, ...] | None = None

    def __post_init__(self) -> None:
        if self.full_args is None:
            self.full_args = self.args

    def pyro_loss(self, num_particles: int = 1) -> pyro.infer.ELBO:
        """Pyro's own estimator for this model: ``TraceEnum_ELBO`` if enumerated, else ``Trace_ELBO``."""
        cls = TraceEnum_ELBO if self.enumerated else Trace_ELBO
        return cls(num_particles=num_particles, max_plate_nesting=self.max_plate_nesting)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Network weights and generated data from ``seed``, leaving the global random stream as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _digits(n: int) -> Tensor:
    """The first ``n`` of sklearn's 8x8 digits as pixel counts 0..16, shape ``[n, 64]``."""
    from sklearn.datasets import load_digits

    return torch.as_tensor(load_digits().data[:n], dtype=torch.get_default_dtype())


def _eight_schools() -> tuple[Tensor, Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # ArviZ announces its 1.0 refactor
        import arviz as az

        y = az.load_arviz_data("centered_eight").observed_data.obs.values
    dtype = torch.get_default_dtype()
    return torch.as_tensor(y, dtype=dtype), torch.tensor(EIGHT_SCHOOLS_SIGMA, dtype=dtype)


# --- VAE (examples/vae/vae.py) -------------------------------------------------------------------


class _Encoder(nn.Module):
    def __init__(self, x_dim: int, z_dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(x_dim, hidden), nn.Linear(hidden, z_dim), nn.Linear(hidden, z_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = nn.functional.softplus(self.fc1(x))
        return self.fc21(h), torch.exp(self.fc22(h))


class _Decoder(nn.Module):
    def __init__(self, x_dim: int, z_dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc21 = nn.Linear(z_dim, hidden), nn.Linear(hidden, x_dim)

    def forward(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.fc21(nn.functional.softplus(self.fc1(z))))


class VAE(nn.Module):
    def __init__(self, x_dim: int = 64, z_dim: int = 4, hidden: int = 32) -> None:
        super().__init__()
        self.encoder, self.decoder, self.z_dim = _Encoder(x_dim, z_dim, hidden), _Decoder(x_dim, z_dim, hidden), z_dim

    def model(self, x: Tensor) -> None:
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], self.z_dim)))
            z_scale = x.new_ones(torch.Size((x.shape[0], self.z_dim)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            pyro.sample("obs", dist.Bernoulli(self.decoder(z), validate_args=False).to_event(1), obs=x)

    def guide(self, x: Tensor) -> None:
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = self.encoder(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))


def vae() -> ZooEntry:
    with _seeded(0):
        net = VAE()
    x = (_digits(128) >= 8).to(torch.get_default_dtype())  # binarized, as the MNIST VAE
    return ZooEntry("vae", net.model, net.guide, (x,), 1, False, len(x), "examples/vae/vae.py")


# --- sparse gamma DEF (examples/sparse_gamma_def.py) ---------------------------------------------


class SparseGammaDEF:
    alpha_z, beta_z, alpha_w, beta_w = 0.1, 0.1, 0.1, 0.3

    def __init__(self, data_size: int, top: int = 6, mid: int = 4, bottom: int = 3) -> None:
        self.d, self.top, self.mid, self.bottom = data_size, top, mid, bottom

    def model(self, x: Tensor) -> None:
        widths = ((self.top, self.mid), (self.mid, self.bottom), (self.bottom, self.d))
        ws = []
        for name, (rows, cols) in zip(("top", "mid", "bottom"), widths):
            with pyro.plate(f"w_{name}_plate", rows * cols):
                w = pyro.sample(f"w_{name}", dist.Gamma(self.alpha_w, self.beta_w))
            ws.append(w.reshape(rows, cols) if w.dim() == 1 else w.reshape(-1, rows, cols))
        with pyro.plate("data", x.size(0)):
            z_top = pyro.sample("z_top", dist.Gamma(self.alpha_z, self.beta_z).expand([self.top]).to_event(1))
            z_mid = pyro.sample("z_mid", dist.Gamma(self.alpha_z, self.beta_z / torch.matmul(z_top, ws[0])).to_event(1))
            z_bottom = pyro.sample(
                "z_bottom", dist.Gamma(self.alpha_z, self.beta_z / torch.matmul(z_mid, ws[1])).to_event(1)
            )
            pyro.sample("obs", dist.Poisson(torch.matmul(z_bottom, ws[2])).to_event(1), obs=x)

    def guide(self, x: Tensor) -> None:
        softplus = nn.functional.softplus

        def init(*shape: int) -> Callable[[], Tensor]:
            return lambda: 0.5 + 0.1 * torch.randn(shape)

        for name, size in (
            ("top", self.top * self.mid),
            ("mid", self.mid * self.bottom),
            ("bottom", self.bottom * self.d),
        ):
            with pyro.plate(f"w_{name}_plate", size):
                alpha, mean = (
                    softplus(pyro.param(f"alpha_w_q_{name}", init(size))),
                    softplus(pyro.param(f"mean_w_q_{name}", init(size))),
                )
                pyro.sample(f"w_{name}", dist.Gamma(alpha, alpha / mean))
        with pyro.plate("data", x.size(0)):
            for name, width in (("top", self.top), ("mid", self.mid), ("bottom", self.bottom)):
                alpha = softplus(pyro.param(f"alpha_z_q_{name}", init(x.size(0), width)))
                mean = softplus(pyro.param(f"mean_z_q_{name}", init(x.size(0), width)))
                pyro.sample(f"z_{name}", dist.Gamma(alpha, alpha / mean).to_event(1))


def sparse_gamma_def() -> ZooEntry:
    x = _digits(32)
    net = SparseGammaDEF(x.shape[1])
    return ZooEntry("sparse_gamma_def", net.model, net.guide, (x,), 1, False, len(x), "examples/sparse_gamma_def.py")


# --- LDA (examples/lda.py) -----------------------------------------------------------------------


def _lda_corpus(num_docs: int, num_words: int, num_topics: int, words_per_doc: int) -> Tensor:
    """Word ids ``[words_per_doc, num_docs]`` drawn from LDA's generative process."""
    topic_words = dist.Dirichlet(torch.full((num_topics, num_words), 0.2)).sample()
    doc_topics = dist.Dirichlet(torch.full((num_topics,), 0.5)).sample((num_docs,))
    word_topics = dist.Categorical(doc_topics).sample((words_per_doc,))
    return dist.Categorical(topic_words[word_topics]).sample()


class AmortizedLDA(nn.Module):
    """LDA with word topics summed out in closed form (``p(w | d) = doc_topics @ topic_words``),
    documents subsampled, and an amortized guide for each document's topics."""

    def __init__(self, num_words: int, num_topics: int, words_per_doc: int, hidden: int = 16) -> None:
        super().__init__()
        self.num_words, self.num_topics, self.words_per_doc = num_words, num_topics, words_per_doc
        self.encoder = nn.Sequential(nn.Linear(num_words, hidden), nn.Softplus(), nn.Linear(hidden, num_topics))

    def model(self, counts: Tensor, batch_size: int | None) -> None:
        with pyro.plate("topics", self.num_topics):
            topic_words = pyro.sample("topic_words", dist.Dirichlet(counts.new_ones(self.num_words) / self.num_words))
        with pyro.plate("documents", counts.shape[0], subsample_size=batch_size) as ind:
            doc_topics = pyro.sample("doc_topics", dist.Dirichlet(counts.new_ones(self.num_topics)))
            probs = doc_topics @ topic_words
            pyro.sample("doc_words", dist.Multinomial(self.words_per_doc, probs), obs=counts[ind])

    def guide(self, counts: Tensor, batch_size: int | None) -> None:
        pyro.module("lda_encoder", self.encoder)
        concentration = pyro.param(
            "topic_words_q",
            lambda: counts.new_ones(self.num_topics, self.num_words),
            constraint=dist.constraints.positive,
        )
        with pyro.plate("topics", self.num_topics):
            pyro.sample("topic_words", dist.Dirichlet(concentration))
        with pyro.plate("documents", counts.shape[0], subsample_size=batch_size) as ind:
            pyro.sample("doc_topics", dist.Dirichlet(nn.functional.softplus(self.encoder(counts[ind])) + 1e-3))


def lda_amortized() -> ZooEntry:
    num_words, num_topics = 12, 3
    with _seeded(1):
        words = _lda_corpus(40, num_words, num_topics, 16)
        net = AmortizedLDA(num_words, num_topics, 16)
    counts = nn.functional.one_hot(words, num_words).sum(0).to(torch.get_default_dtype())  # [docs, words]
    return ZooEntry(
        "lda_amortized",
        net.model,
        net.guide,
        (counts, 8),
        1,
        False,
        len(counts),
        "examples/lda.py",
        subsampled=True,
        full_args=(counts, None),
    )


class EnumeratedLDA:
    """Pyro's LDA: each word's topic is a discrete latent summed out by parallel enumeration."""

    def __init__(self, num_words: int, num_topics: int, num_docs: int) -> None:
        self.num_words, self.num_topics, self.num_docs = num_words, num_topics, num_docs

    def model(self, data: Tensor) -> None:
        with pyro.plate("topics", self.num_topics):
            topic_weights = pyro.sample("topic_weights", dist.Gamma(1.0 / self.num_topics, 1.0))
            topic_words = pyro.sample("topic_words", dist.Dirichlet(data.new_ones(self.num_words) / self.num_words))
        with pyro.plate("documents", self.num_docs):
            doc_topics = pyro.sample("doc_topics", dist.Dirichlet(topic_weights))
            with pyro.plate("words", data.shape[0]):
                word_topics = pyro.sample("word_topics", dist.Categorical(doc_topics), infer={"enumerate": "parallel"})
                pyro.sample("doc_words", dist.Categorical(topic_words[word_topics]), obs=data)

    def guide(self, data: Tensor) -> None:
        positive = dist.constraints.positive
        ones = functools.partial(torch.ones, dtype=torch.get_default_dtype())
        with pyro.plate("topics", self.num_topics):
            shape = pyro.param("topic_weights_shape", lambda: ones(self.num_topics), constraint=positive)
            rate = pyro.param("topic_weights_rate", lambda: ones(self.num_topics), constraint=positive)
            pyro.sample("topic_weights", dist.Gamma(shape, rate))
            words = pyro.param("topic_words_q", lambda: ones(self.num_topics, self.num_words), constraint=positive)
            pyro.sample("topic_words", dist.Dirichlet(words))
        with pyro.plate("documents", self.num_docs):
            topics = pyro.param("doc_topics_q", lambda: ones(self.num_docs, self.num_topics), constraint=positive)
            pyro.sample("doc_topics", dist.Dirichlet(topics))


def lda_enum() -> ZooEntry:
    num_words, num_topics, num_docs = 12, 3, 10
    with _seeded(2):
        words = _lda_corpus(num_docs, num_words, num_topics, 8)
    net = EnumeratedLDA(num_words, num_topics, num_docs)
    return ZooEntry(
        "lda_enum", net.model, net.guide, (words.to(torch.get_default_dtype()),), 2, True, num_docs, "examples/lda.py"
    )


# --- deep Markov model (examples/dmm.py) ----------------------------------------------------------


class _GatedTransition(nn.Module):
    def __init__(self, z_dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, z_dim), nn.Sigmoid())
        self.proposed = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, z_dim))
        self.loc, self.scale = nn.Linear(z_dim, z_dim), nn.Linear(z_dim, z_dim)
        nn.init.eye_(self.loc.weight)
        nn.init.zeros_(self.loc.bias)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        gate, proposed = self.gate(z), self.proposed(z)
        loc = (1 - gate) * self.loc(z) + gate * proposed
        return loc, nn.functional.softplus(self.scale(nn.functional.relu(proposed)))


class _Combiner(nn.Module):
    def __init__(self, z_dim: int, rnn_dim: int) -> None:
        super().__init__()
        self.z_to_h, self.loc, self.scale = (
            nn.Linear(z_dim, rnn_dim),
            nn.Linear(rnn_dim, z_dim),
            nn.Linear(rnn_dim, z_dim),
        )

    def forward(self, z: Tensor, h_rnn: Tensor) -> tuple[Tensor, Tensor]:
        h = 0.5 * (torch.tanh(self.z_to_h(z)) + h_rnn)
        return self.loc(h), nn.functional.softplus(self.scale(h))


class DMM(nn.Module):
    """Deep Markov model: GRU guide over reversed packed sequences, ``pyro.markov`` over time,
    KL annealing with ``poutine.scale`` and masks for sequences of different lengths."""

    def __init__(self, x_dim: int = 8, z_dim: int = 2, hidden: int = 8, rnn_dim: int = 8) -> None:
        super().__init__()
        self.emitter = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, x_dim), nn.Sigmoid())
        self.trans, self.combiner = _GatedTransition(z_dim, hidden), _Combiner(z_dim, rnn_dim)
        self.rnn = nn.GRU(input_size=x_dim, hidden_size=rnn_dim, batch_first=True)
        self.z_0, self.z_q_0 = nn.Parameter(torch.zeros(z_dim)), nn.Parameter(torch.zeros(z_dim))
        self.h_0 = nn.Parameter(torch.zeros(1, 1, rnn_dim))

    def model(self, seqs: Tensor, seqs_reversed: Tensor, mask: Tensor, lengths: Tensor, annealing: float) -> None:
        pyro.module("dmm", self)
        z_prev = self.z_0.expand(seqs.size(0), self.z_0.size(0))
        with pyro.plate("z_minibatch", len(seqs)):
            for t in pyro.markov(range(1, seqs.size(1) + 1)):
                z_loc, z_scale = self.trans(z_prev)
                with pyro.poutine.scale(scale=annealing):
                    z_t = pyro.sample(f"z_{t}", dist.Normal(z_loc, z_scale).mask(mask[:, t - 1 : t]).to_event(1))
                probs = self.emitter(z_t)
                pyro.sample(
                    f"obs_x_{t}", dist.Bernoulli(probs).mask(mask[:, t - 1 : t]).to_event(1), obs=seqs[:, t - 1]
                )
                z_prev = z_t

    def guide(self, seqs: Tensor, seqs_reversed: Tensor, mask: Tensor, lengths: Tensor, annealing: float) -> None:
        pyro.module("dmm", self)
        h_0 = self.h_0.expand(1, seqs.size(0), self.rnn.hidden_size).contiguous()
        packed = nn.utils.rnn.pack_padded_sequence(seqs_reversed, lengths, batch_first=True, enforce_sorted=False)
        rnn_output, _ = self.rnn(packed, h_0)
        rnn_output = _reverse_sequences(nn.utils.rnn.pad_packed_sequence(rnn_output, batch_first=True)[0], lengths)
        z_prev = self.z_q_0.expand(seqs.size(0), self.z_q_0.size(0))
        with pyro.plate("z_minibatch", len(seqs)):
            for t in pyro.markov(range(1, seqs.size(1) + 1)):
                z_loc, z_scale = self.combiner(z_prev, rnn_output[:, t - 1, :])
                with pyro.poutine.scale(scale=annealing):
                    z_t = pyro.sample(f"z_{t}", dist.Normal(z_loc, z_scale).mask(mask[:, t - 1 : t]).to_event(1))
                z_prev = z_t


def _reverse_sequences(seqs: Tensor, lengths: Tensor) -> Tensor:
    """Reverse the first ``lengths[i]`` steps of each sequence (examples/polyphonic_data_loader.py)."""
    out = torch.zeros_like(seqs)
    for i, length in enumerate(lengths.tolist()):
        out[i, :length] = seqs[i, :length].flip(0)
    return out


def dmm() -> ZooEntry:
    num_seqs, t_max, x_dim = 6, 5, 8
    with _seeded(3):
        net = DMM(x_dim=x_dim)
        lengths = torch.tensor([5, 4, 5, 3, 4, 5])
        seqs = torch.bernoulli(torch.full((num_seqs, t_max, x_dim), 0.3)).to(torch.get_default_dtype())
    mask = (torch.arange(t_max) < lengths.unsqueeze(-1)).to(seqs.dtype)
    seqs = seqs * mask.unsqueeze(-1)
    args = (seqs, _reverse_sequences(seqs, lengths), mask, lengths, 1.0)
    return ZooEntry("dmm", net.model, net.guide, args, 1, False, num_seqs, "examples/dmm.py")


# --- sparse GP (tutorial "Gaussian processes") -----------------------------------------------------


def sparse_gp() -> ZooEntry:
    dtype = torch.get_default_dtype()
    with _seeded(4):
        X = torch.linspace(0.0, 5.0, 30, dtype=dtype)
        y = 0.5 * torch.sin(3 * X) + 0.2 * torch.randn(30, dtype=dtype)
        kernel = gp.kernels.RBF(input_dim=1)
        kernel.lengthscale = PyroSample(dist.LogNormal(torch.tensor(0.0, dtype=dtype), 1.0))
        kernel.variance = PyroSample(dist.LogNormal(torch.tensor(0.0, dtype=dtype), 1.0))
        gpr = gp.models.SparseGPRegression(X, y, kernel, Xu=torch.linspace(0.0, 5.0, 6, dtype=dtype), jitter=1e-3)
        gpr.kernel.autoguide("lengthscale", dist.Normal)
        gpr.kernel.autoguide("variance", dist.Normal)
    return ZooEntry("sparse_gp", gpr.model, gpr.guide, (), 0, False, 30, "tutorial: Gaussian processes")


# --- Bayesian regression (tutorial "Bayesian regression, part I/II") ------------------------------


class BayesianRegression(PyroModule):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = PyroModule[nn.Linear](in_features, out_features)
        self.linear.weight = PyroSample(dist.Normal(0.0, 1.0).expand([out_features, in_features]).to_event(2))
        self.linear.bias = PyroSample(dist.Normal(0.0, 10.0).expand([out_features]).to_event(1))

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        sigma = pyro.sample("sigma", dist.Uniform(0.0, 10.0))
        mean = self.linear(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mean, sigma), obs=y)
        return mean


def _rugged_like(n: int = 50) -> tuple[Tensor, Tensor]:
    """Africa indicator, ruggedness and their interaction; log GDP from the tutorial's fitted line."""
    africa = (torch.arange(n) % 3 == 0).to(torch.get_default_dtype())
    rugged = torch.rand(n) * 4
    x = torch.stack([africa, rugged, africa * rugged], -1)
    return x, 9.2 - 1.9 * africa - 0.2 * rugged + 0.4 * africa * rugged + 0.9 * torch.randn(n)


def _bayes_regression(name: str, guide_cls: Callable[..., Any]) -> ZooEntry:
    with _seeded(5):
        x, y = _rugged_like()
        regression = BayesianRegression(3, 1)
    dtype = torch.get_default_dtype()
    return ZooEntry(
        name,
        regression,
        guide_cls(regression),
        (x.to(dtype), y.to(dtype)),
        1,
        False,
        len(x),
        "tutorial: Bayesian regression",
    )


def bayes_regression_diag() -> ZooEntry:
    return _bayes_regression("bayes_regression_diag", AutoDiagonalNormal)


def bayes_regression_mvn() -> ZooEntry:
    return _bayes_regression("bayes_regression_mvn", AutoMultivariateNormal)


# --- eight schools (hierarchical) with autoguides, flows included ----------------------------------


def eight_schools_model(y: Tensor, sigma: Tensor) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(y)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def eight_schools() -> ZooEntry:
    return ZooEntry(
        "eight_schools",
        eight_schools_model,
        AutoNormal(eight_schools_model),
        _eight_schools(),
        1,
        False,
        8,
        "Rubin (1981), ArviZ's bundled data",
    )


def iaf_guide() -> ZooEntry:
    with _seeded(6):
        guide = AutoIAFNormal(eight_schools_model, hidden_dim=[16], num_transforms=2)
    return ZooEntry("iaf_guide", eight_schools_model, guide, _eight_schools(), 1, False, 8, "AutoIAFNormal")


def bnaf_guide() -> ZooEntry:
    with _seeded(7):
        guide = AutoNormalizingFlow(eight_schools_model, functools.partial(iterated, 2, block_autoregressive))
    return ZooEntry(
        "bnaf_guide",
        eight_schools_model,
        guide,
        _eight_schools(),
        1,
        False,
        8,
        "AutoNormalizingFlow (block neural autoregressive flow)",
    )


# --- enumerated discrete latents: Gaussian mixture, HMM ------------------------------------------


@config_enumerate
def gmm_model(data: Tensor) -> None:
    weights = pyro.sample("weights", dist.Dirichlet(0.5 * data.new_ones(2)))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 2.0))
    with pyro.plate("components", 2):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


def gmm() -> ZooEntry:
    with _seeded(8):
        data = torch.cat([torch.randn(10) - 3.0, torch.randn(10) + 3.0]).to(torch.get_default_dtype())
    guide = AutoNormal(pyro.poutine.block(gmm_model, hide=["assignment"]))
    return ZooEntry("gmm_enum", gmm_model, guide, (data,), 1, True, len(data), "tutorial: Gaussian mixture model")


def hmm_model(sequences: Tensor) -> None:
    """examples/hmm.py's model_1 vectorized over sequences: a hidden state per step, Bernoulli tones."""
    num_sequences, length, data_dim = sequences.shape
    hidden = 3
    probs_x = pyro.sample("probs_x", dist.Dirichlet(0.9 * torch.eye(hidden, dtype=sequences.dtype) + 0.1).to_event(1))
    probs_y = pyro.sample("probs_y", dist.Beta(0.1, 0.9).expand([hidden, data_dim]).to_event(2))
    tones = pyro.plate("tones", data_dim, dim=-1)
    with pyro.plate("sequences", num_sequences, dim=-2):
        x = 0
        for t in pyro.markov(range(length)):
            x = pyro.sample(f"x_{t}", dist.Categorical(probs_x[x]), infer={"enumerate": "parallel"})
            with tones:
                pyro.sample(f"y_{t}", dist.Bernoulli(probs_y[x.squeeze(-1)]), obs=sequences[:, t])


def hmm() -> ZooEntry:
    with _seeded(9):
        seqs = torch.bernoulli(torch.full((6, 8, 4), 0.4)).to(torch.get_default_dtype())
    guide = AutoNormal(pyro.poutine.block(hmm_model, expose=["probs_x", "probs_y"]))
    return ZooEntry("hmm_enum", hmm_model, guide, (seqs,), 2, True, len(seqs), "examples/hmm.py")


# --- baseball (examples/baseball.py) ---------------------------------------------------------------


def baseball_logit_model(at_bats: Tensor, hits: Tensor) -> None:
    loc = pyro.sample("loc", dist.Normal(-1.0, 1.0))
    scale = pyro.sample("scale", dist.HalfCauchy(1.0))
    with pyro.plate("num_players", at_bats.shape[0]):
        alpha = pyro.sample("alpha", dist.Normal(loc, scale))
        pyro.sample("obs", dist.Binomial(at_bats, logits=alpha), obs=hits)


def baseball_pooled_model(at_bats: Tensor, hits: Tensor) -> None:
    phi = pyro.sample("phi", dist.Uniform(0.0, 1.0))
    with pyro.plate("num_players", at_bats.shape[0]):
        pyro.sample("obs", dist.Binomial(at_bats, probs=phi), obs=hits)


def _baseball_data() -> tuple[Tensor, Tensor]:
    dtype = torch.get_default_dtype()
    return torch.full((18,), 45.0, dtype=dtype), torch.tensor(BASEBALL_HITS, dtype=dtype)


def baseball_logit() -> ZooEntry:
    model = baseball_logit_model
    return ZooEntry("baseball_logit", model, AutoNormal(model), _baseball_data(), 1, False, 18, "examples/baseball.py")


def baseball_pooled() -> ZooEntry:
    model = baseball_pooled_model
    return ZooEntry("baseball_pooled", model, AutoNormal(model), _baseball_data(), 1, False, 18, "examples/baseball.py")


#: name -> factory of a fresh entry
ZOO: dict[str, Callable[[], ZooEntry]] = {
    "vae": vae,
    "sparse_gamma_def": sparse_gamma_def,
    "lda_amortized": lda_amortized,
    "lda_enum": lda_enum,
    "dmm": dmm,
    "sparse_gp": sparse_gp,
    "bayes_regression_diag": bayes_regression_diag,
    "bayes_regression_mvn": bayes_regression_mvn,
    "iaf_guide": iaf_guide,
    "bnaf_guide": bnaf_guide,
    "gmm_enum": gmm,
    "hmm_enum": hmm,
    "eight_schools": eight_schools,
    "baseball_logit": baseball_logit,
    "baseball_pooled": baseball_pooled,
}


def cli_model_file(name: str) -> str:
    """Source of a model file for ``pyro-elbo run FILE`` that serves zoo entry ``name``."""
    here = repr(str(__import__("pathlib").Path(__file__).resolve().parent))
    return (
        f"import sys\nsys.path.insert(0, {here})\nfrom pyro_models import ZOO\n\n"
        f"_entry = ZOO[{name!r}]()\nmodel, guide = _entry.model, _entry.guide\n\n\n"
        "def data():\n    return _entry.args\n\n\n"
        "def full_data():\n    return _entry.full_args or _entry.args\n"
    )
