"""The contract every invertible transform follows."""

from __future__ import annotations

from torch import Tensor, nn


class Transform(nn.Module):
    """An invertible map between a data-side tensor x and a noise-side tensor z.

    Directions are part of the contract:

    - :meth:`forward` maps data to noise (x → z) and returns ``(z, log_det)``, where
      ``log_det`` has shape (B,) and is the per-sample SUM over dimensions of
      log |det ∂z/∂x|;
    - :meth:`inverse` maps noise to data (z → x) exactly.

    ``y`` is an optional condition (class labels, shape (B,)). Transforms that are not
    conditioned accept and ignore it, so a composition can pass it to every member.
    """

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        raise NotImplementedError
