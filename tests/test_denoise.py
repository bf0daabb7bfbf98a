"""Tweedie denoising through the flow's own score."""

from __future__ import annotations

import torch

from tarflow import ImageFlow, ImageFlowConfig
from tarflow.sampling.denoise import tweedie_denoise


def test_tweedie_step_on_identity_flow_is_shrinkage():
    # The identity flow has log p(x) = sum log N(x; 0, 1), whose score is -x, so
    # x + sigma^2 * score = (1 - sigma^2) x exactly.
    config = ImageFlowConfig(
        image_size=4, patch_size=2, width=16, heads=2, block_depths=[1], num_classes=2
    )
    model = ImageFlow(config).double()
    x = 0.5 * torch.randn(5, 1, 4, 4, dtype=torch.float64)  # inside [-1 - 6σ, 1 + 6σ]
    y = torch.tensor([0, 1, 0, 1, 0])
    out = tweedie_denoise(model, x, 0.3, y, batch_size=2)
    torch.testing.assert_close(out, (1 - 0.09) * x)
    assert not out.requires_grad
    assert torch.equal(tweedie_denoise(model, x, 0.0, y), x)
