"""Moving flow blocks away from their identity initialisation for tests."""

from __future__ import annotations

import torch

from tarflow.flows import AutoregressiveBlock


def randomize(module: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """Gives every autoregressive block random output weights, so tests exercise
    non-trivial shifts and scales instead of the identity."""
    generator = torch.Generator().manual_seed(1)
    for block in module.modules():
        if isinstance(block, AutoregressiveBlock):
            with torch.no_grad():
                for p in block.head.parameters():
                    p.copy_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return module
