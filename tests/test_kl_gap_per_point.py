"""Per-data-point reports: for a data plate enclosing every latent, each point's k-hat, ESS and
bracket, their distribution, the worst points by index, and a verdict that reads the whole
distribution (before: the verdict and the headline numbers were the single worst point's,
unlabelled). Margins: the one bad point's guide is 5x too narrow and 3 sd off (k-hat > 1 on every
seed of 0-19), the others are 1.3x too wide (bounded weights, k-hat < 0.3 on every seed)."""

from __future__ import annotations

import math

import matplotlib
import pyro
import pyro.distributions as dist
import torch

import pyro_elbo

matplotlib.use("Agg")

POINTS = 50
POST_SCALE = math.sqrt(0.5)


def amortized(bad: int = 0) -> tuple[object, object, torch.Tensor]:
    """z_i ~ N(0, 1), x_i ~ N(z_i, 1): p(z_i | x_i) = N(x_i / 2, 1/2). The guide is 1.3x too wide
    for every point but ``bad``, where it is 5x too narrow and 3 posterior sd off."""
    x = torch.linspace(-2.0, 2.0, POINTS)
    shift = torch.zeros(POINTS)
    shift[bad] = 3 * POST_SCALE
    scale = torch.full((POINTS,), 1.3 * POST_SCALE)
    scale[bad] = 0.2 * POST_SCALE

    def model(x: torch.Tensor) -> None:
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x: torch.Tensor) -> None:
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(x / 2 + shift, scale))

    return model, guide, x


def test_one_bad_point_is_named_and_the_others_are_reported() -> None:
    model, guide, x = amortized(bad=17)
    report = pyro_elbo.kl_gap(model, guide, x, num_particles=2000, per_site=False)
    points = report.per_point
    assert points is not None and report.num_points == POINTS
    for values in (points.khat, points.ess, points.kl_lower, points.kl_upper):
        assert values.shape == (POINTS,)
    assert points.worst(1) == [17] and points.unreliable.nonzero().flatten().tolist() == [17]
    assert report.khat == float(points.khat[17]) and report.ess == float(points.ess[17])
    assert report.verdict.startswith("BAD for 1 of 50 data points") and "#17" in report.verdict
    assert "the other 49 are reliable" in report.verdict
    text = str(report)
    assert "(worst data point)" in text and "per data point (50; the k-hat and ESS above are the worst point's)" in text
    assert "> 0.7 at 2.0% of points" in text and "worst       #17" in text
    assert report.kl_interval[1] == math.inf  # the total includes the bad point
    figure = report.plot()
    assert len(figure.axes) == 2 and figure.axes[1].get_title() == "per-point PSIS k-hat"


def test_all_good_points_give_the_usual_verdict() -> None:
    model, guide, x = amortized(bad=0)

    def wide(x: torch.Tensor) -> None:
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(x / 2, 1.3 * POST_SCALE))

    report = pyro_elbo.kl_gap(model, wide, x, num_particles=2000, per_site=False)
    assert report.per_point is not None and not report.per_point.unreliable.any()
    assert not report.verdict.startswith(("BAD", "inconsistent"))
