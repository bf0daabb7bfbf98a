"""The base distribution of the flow."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class StandardGaussian(nn.Module):
    """N(0, I) over everything but the batch dimension.

    log N(z; 0, 1) = −z²/2 − log(2π)/2 per dimension, summed per sample.
    """

    def log_prob(self, z: Tensor) -> Tensor:
        per_dim = -0.5 * z.square() - 0.5 * math.log(2 * math.pi)
        return per_dim.flatten(1).sum(1)

    def sample(
        self,
        shape: tuple[int, ...],
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """Draws N(0, temperature² I) noise of ``shape`` on ``device``; with a generator, the
        draw is made on the generator's device (so a CPU generator gives the same noise
        whichever device the model is on)."""
        source = device if generator is None else generator.device
        z = torch.randn(shape, generator=generator, dtype=dtype, device=source)
        return z.to(device) * temperature
