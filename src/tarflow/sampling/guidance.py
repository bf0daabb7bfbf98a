"""Classifier-free guidance rules for the affine parameters of one token.

Both rules take the conditional (μ_c, a_c) and unconditional (μ_u, a_u) predictions of
an autoregressive block, where a is the log-scale (σ = exp a), and return the (μ, a)
used by the inverse x_t = z_t·exp(a) + μ. Reference: Zhai et al., "Normalizing Flows are
Capable Generative Models" (2024), section on guidance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

RULES = ("extrapolate", "density_ratio")


@dataclass(frozen=True)
class Guidance:
    """Guidance settings for sampling.

    Arguments:
        weight: w ≥ 0; 0 turns guidance off.
        rule: ``"extrapolate"`` moves (μ, a) away from the unconditional prediction,
            μ ← μ_c + w(μ_c − μ_u) and likewise for a. ``"density_ratio"`` samples from
            the normalised N(μ_c, σ_c²)^(1+w) / N(μ_u, σ_u²)^w, a Gaussian with precision
            λ = (1+w)/σ_c² − w/σ_u² (σ_c/σ_u clipped at 1 so λ > 0).
        ramp: raise w linearly from w/T at the first token to w at the last.
    """

    weight: float = 1.0
    rule: str = "extrapolate"
    ramp: bool = False

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown guidance rule {self.rule!r}; choose one of {RULES}")
        if not math.isfinite(self.weight) or self.weight < 0:
            raise ValueError(f"guidance weight must be a finite number >= 0, got {self.weight}")

    def weight_at(self, positions: Tensor, num_tokens: int) -> Tensor:
        """w for tokens at ``positions`` (a 1-D index tensor), shaped to broadcast over
        (B, n, d) parameters."""
        w = torch.full(positions.shape, self.weight, dtype=torch.float32, device=positions.device)
        if self.ramp:
            w = w * (positions.float() + 1) / num_tokens
        return w[None, :, None]

    def combine(
        self, mu_c: Tensor, a_c: Tensor, mu_u: Tensor, a_u: Tensor, w: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Guided (μ, a) from the conditional and unconditional predictions."""
        w = w.to(mu_c.dtype)
        if self.rule == "extrapolate":
            return mu_c + w * (mu_c - mu_u), a_c + w * (a_c - a_u)

        # Precision λ = (1 + w − w r²)/σ_c² with r = min(σ_c/σ_u, 1) written in log space.
        r2 = torch.exp(2 * (a_c - a_u).clamp(max=0))
        gain = 1 + w - w * r2
        mu = ((1 + w) * mu_c - w * r2 * mu_u) / gain
        return mu, a_c - 0.5 * torch.log(gain)
