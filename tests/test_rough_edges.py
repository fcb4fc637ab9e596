"""Small things a new user meets: a short ``repr(FitResult)``, loading a finished run, the CLI's
refused resume, the shape message for a missing ``.to_event``, the loss plot's tail."""

from __future__ import annotations

import torch

from pyro_elbo import IWAE, FitResult


def test_fit_result_repr_is_one_short_line() -> None:
    params = {f"AutoNormal.locs.z{i}": torch.zeros(3) for i in range(10)}
    result = FitResult(history=[float(i) for i in range(10_000)], step_seconds=[0.01] * 10_000, params=params)
    result.objective = IWAE(num_particles=8)
    text = repr(result)
    assert "\n" not in text and len(text) < 300, text
    assert text.startswith("FitResult(10000 steps, final loss 9999, 0 skipped, stop_reason='completed'")
    assert "IWAE(num_particles=8)" in text and "AutoNormal.locs.z0" in text and "(10 in all)" in text
    assert "9998" not in text  # no history dump
    assert repr(FitResult()).startswith("FitResult(0 steps, final loss none")
