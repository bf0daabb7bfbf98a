"""One-step score-based denoising of samples from a noise-augmented flow."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from tarflow.models.image_flow import ImageFlow


def tweedie_denoise(
    model: ImageFlow,
    x: Tensor,
    sigma: float,
    y: Tensor | None = None,
    batch_size: int = 256,
) -> Tensor:
    """Tweedie's formula x̂ = x̃ + σ² ∇ log p_σ(x̃), the score taken through the flow.

    A flow trained on x + σε models the density p_σ of noisy data; its samples x̃ are
    noisy. The posterior mean E[x | x̃] is one gradient step away and needs no extra
    network. Reference: Zhai et al. (2024), section on denoising.

    Arguments:
        model: the flow that produced ``x``.
        x: noisy samples (B, C, H, W).
        sigma: σ of the training noise.
        y: labels the samples were drawn for (the score is conditional).
        batch_size: images per gradient pass.

    Returns:
        Denoised images, detached.

    Warning:
        Samples far outside the data range (strong guidance or a high temperature can put
        them there) are first clipped to [−1 − 6σ, 1 + 6σ], where noisy data lies; the
        score is not meaningful beyond it.
    """
    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return x
    if not x.is_floating_point():
        raise ValueError(f"samples must be floating point in [-1, 1], got dtype {x.dtype}")
    x = x.clamp(-1 - 6 * sigma, 1 + 6 * sigma)
    out = []
    for start in range(0, x.shape[0], batch_size):
        chunk = x[start : start + batch_size].detach().clone().requires_grad_(True)
        labels = None if y is None else y[start : start + batch_size]
        with torch.enable_grad():
            log_p = model.log_prob(chunk, labels).sum()
            (score,) = torch.autograd.grad(log_p, chunk)
        out.append((chunk + sigma**2 * score).detach())
    return torch.cat(out)
