"""The two guidance rules of classifier-free guidance."""

from __future__ import annotations

import math

import pytest
import torch

from tarflow.sampling.guidance import Guidance


def test_extrapolation_formula():
    g = Guidance(2.0, "extrapolate")
    w = g.weight_at(torch.tensor([0]), 4)
    mu, a = g.combine(
        torch.tensor([[[1.0]]]), torch.tensor([[[0.5]]]),
        torch.tensor([[[0.0]]]), torch.tensor([[[0.1]]]), w,
    )
    assert mu.item() == pytest.approx(3.0)
    assert a.item() == pytest.approx(0.5 + 2 * 0.4)


def test_density_ratio_equal_scales_shifts_the_mean_only():
    g = Guidance(1.5, "density_ratio")
    w = g.weight_at(torch.tensor([0]), 1)
    mu, a = g.combine(
        torch.tensor([[[2.0]]]), torch.tensor([[[0.3]]]),
        torch.tensor([[[1.0]]]), torch.tensor([[[0.3]]]), w,
    )
    assert mu.item() == pytest.approx(2.0 + 1.5 * 1.0)
    assert a.item() == pytest.approx(0.3)


def test_density_ratio_matches_gaussian_product():
    # sigma_c < sigma_u: the exact product of Gaussians, no clipping involved.
    w, mu_c, s_c, mu_u, s_u = 1.0, 0.5, 0.8, -0.2, 1.3
    lam = (1 + w) / s_c**2 - w / s_u**2
    mean = ((1 + w) * mu_c / s_c**2 - w * mu_u / s_u**2) / lam
    g = Guidance(w, "density_ratio")
    mu, a = g.combine(
        torch.tensor([[[mu_c]]], dtype=torch.float64),
        torch.tensor([[[math.log(s_c)]]], dtype=torch.float64),
        torch.tensor([[[mu_u]]], dtype=torch.float64),
        torch.tensor([[[math.log(s_u)]]], dtype=torch.float64),
        g.weight_at(torch.tensor([0]), 1),
    )
    assert mu.item() == pytest.approx(mean)
    assert a.item() == pytest.approx(-0.5 * math.log(lam))


def test_density_ratio_clips_so_precision_stays_positive():
    # sigma_c much larger than sigma_u would make the raw precision negative.
    g = Guidance(3.0, "density_ratio")
    mu, a = g.combine(
        torch.tensor([[[0.0]]]), torch.tensor([[[2.0]]]),
        torch.tensor([[[1.0]]]), torch.tensor([[[-2.0]]]),
        g.weight_at(torch.tensor([0]), 1),
    )
    assert torch.isfinite(mu).all() and torch.isfinite(a).all()
    assert a.item() == pytest.approx(2.0)  # r clipped to 1: lambda = 1 / sigma_c^2


def test_ramp_rises_to_full_weight():
    g = Guidance(2.0, ramp=True)
    w = g.weight_at(torch.arange(4), 4).flatten()
    assert w.tolist() == pytest.approx([0.5, 1.0, 1.5, 2.0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weight": -1.0}, "weight must be"),
        ({"weight": float("nan")}, "weight must be"),
        ({"rule": "cfg++"}, "unknown guidance rule"),
    ],
)
def test_bad_guidance_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Guidance(**kwargs)
