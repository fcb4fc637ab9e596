"""Programs the generator (tests/program_generator.py) found lies in, pinned as Pyro source with
their exact answers, so that a change of the grammar cannot lose them."""

from __future__ import annotations

REGRESSIONS: dict[int, dict[str, object]] = {
    1037: {
        "why": "a size-less plate holding pyro.deterministic: its Delta's value is one event, so the plate was read as shared and every point merged into one",
        "family": "normal",
        "layout": "local",
        "plate": "sizeless",
        "guide_kind": "dropout",
        "dtype": "float32",
        "extras": ("deterministic",),
        "log_evidence": -12.416088912155317,
        "points": 4,
        "shift": 0.0,
        "kl": None,
        "source": 'import torch, pyro, pyro.distributions as dist\nfrom torch import nn\nfrom pyro import poutine\nfrom pyro.infer.autoguide import AutoNormal, AutoMultivariateNormal\nfrom pyro.infer.reparam import LocScaleReparam\ntorch.set_default_dtype(torch.float32)\ndata = torch.tensor([-3.743664084911428, -1.5287616480560307, -0.5532189586068741, -2.692438603149758, -3.480234937100253, -1.711396561105141, -0.4363652702718592, -2.555049630012916, -3.963485787173145, -1.0137313628445686, -0.05917997788392526, -2.068535390548637, -3.5618491384455, -1.7934749831307848, -0.08720242639327058, -2.8324370124067246]).reshape((4, 4))\nmask = torch.tensor([[True, True, True, True], [True, True, True, True], [True, True, True, True], [True, True, True, True]])\n\ndef model(data):\n    with pyro.plate("data"):\n        z = pyro.sample("z", dist.Normal(torch.full((data.shape[-1],), -1.4461557898555304), 1.9858862905125192))\n        pyro.deterministic("z_twice", 2 * z)\n        with pyro.plate("trials", 4, dim=-2), poutine.mask(mask=mask):\n            pyro.sample("x", dist.Normal(z, 0.3007787367117009), obs=data)\n\ntorch.manual_seed(1037)\nnet = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 2))\n\ndef guide_dist(data):\n    out = net(data.mean(0).unsqueeze(-1))\n    return dist.Normal(out[..., 0], nn.functional.softplus(out[..., 1]) + 0.05)\n\ndef guide(data):\n    pyro.module("net", net)\n    with pyro.plate("data"):\n        pyro.sample("z", guide_dist(data))\n',
    },
    2261: {
        "why": "a wide Beta guide in float32: a quarter of its draws clamped to 1 - eps, the KL's upper end 4.4 for an exact KL of 5.04, no warning",
        "family": "beta_bernoulli",
        "layout": "global",
        "plate": "sized",
        "guide_kind": "wide",
        "dtype": "float32",
        "extras": (),
        "log_evidence": -0.7670121183729144,
        "points": 1,
        "shift": 0.0,
        "kl": 5.043316237879847,
        "source": 'import torch, pyro, pyro.distributions as dist\nfrom torch import nn\nfrom pyro import poutine\nfrom pyro.infer.autoguide import AutoNormal, AutoMultivariateNormal\nfrom pyro.infer.reparam import LocScaleReparam\ntorch.set_default_dtype(torch.float32)\ndata = torch.tensor([1.0, 1.0, 1.0]).reshape((3, 1))[:, 0]\nmask = torch.tensor([[True], [True], [True]])[:, 0]\n\ndef model(data):\n    z = pyro.sample("z", dist.Beta(2.4201908330692183, 0.9445218083874867))\n    with pyro.plate("data", 3), poutine.mask(mask=mask):\n        pyro.sample("x", dist.Bernoulli(z), obs=data)\n\ndef guide_dist(data, idx=None):\n    return dist.Beta(torch.tensor([0.6022434258965799]).reshape(()), torch.tensor([0.10494686759860959]).reshape(()))\n\ndef guide(data):\n    pyro.sample("z", guide_dist(data))\n',
    },
}
