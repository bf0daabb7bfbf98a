"""Bits per dimension: the conversion formula and the full evaluation on a known case."""

from __future__ import annotations

import math

import pytest
import torch

from tarflow import ImageFlow, ImageFlowConfig
from tarflow.data import ImageDataset
from tarflow.evaluate.bits_per_dim import bits_per_dim, evaluate_bits_per_dim

# The identity flow scores x ~ U[-1, 1] with a standard Gaussian. Per dimension:
# E[-log N(x)] = log(2 pi)/2 + E[x^2]/2 = log(2 pi)/2 + 1/6 nats, and moving to the pixel
# grid adds -log(2/256). Uniform density on [-1, 1] alone would give exactly 8 bits.
IDENTITY_ON_UNIFORM_BPD = (0.5 * math.log(2 * math.pi) + 1 / 6 - math.log(2 / 256)) / math.log(2)


def test_uniform_density_is_eight_bits():
    num_dims = 10
    log_p = torch.tensor([num_dims * math.log(0.5)])
    assert bits_per_dim(log_p, num_dims).item() == pytest.approx(8.0)


def test_identity_flow_on_uniform_pixels_matches_closed_form():
    config = ImageFlowConfig(
        image_size=8, patch_size=4, width=16, heads=2, block_depths=[1, 1], num_classes=10
    )
    model = ImageFlow(config)  # zero-initialised heads: the identity map
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (4000, 1, 8, 8), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, 10, (4000,), generator=generator)
    data = ImageDataset(pixels, labels, tuple("0123456789"))
    result = evaluate_bits_per_dim(model, data, batch_size=1000)
    # Per-image bpd has std ~0.07 over 64 dims, so the mean of 4000 is within ~0.003.
    assert result["bits_per_dim"] == pytest.approx(IDENTITY_ON_UNIFORM_BPD, abs=0.01)
    assert 0 < result["standard_error"] < 0.005
    assert result["num_images"] == 4000 and result["draws"] == 1


def test_importance_weighting_tightens_the_bound():
    config = ImageFlowConfig(
        image_size=8, patch_size=4, width=16, heads=2, block_depths=[1], num_classes=0
    )
    model = ImageFlow(config)
    pixels = torch.randint(100, 156, (200, 1, 8, 8), dtype=torch.uint8)
    data = ImageDataset(pixels, torch.zeros(200, dtype=torch.long), ("a",))
    one = evaluate_bits_per_dim(model, data, draws=1)
    many = evaluate_bits_per_dim(model, data, draws=8)
    assert many["bits_per_dim"] <= one["bits_per_dim"] + 1e-3
    with pytest.raises(ValueError, match="draws"):
        evaluate_bits_per_dim(model, data, draws=0)
