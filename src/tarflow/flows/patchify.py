"""Images to token sequences and back."""

from __future__ import annotations

import torch
from torch import Tensor

from tarflow.flows.base import Transform


class Patchify(Transform):
    """Cuts (B, C, H, W) images into non-overlapping p×p patches, in raster order.

    Data → noise direction (:meth:`forward`) gives tokens of shape (B, T, d) with
    T = (H/p)(W/p) and d = C·p², each token laid out as (c, i, j). It only moves values,
    so its log-determinant is zero.

    Arguments:
        channels: C.
        height: H; a multiple of ``patch_size``.
        width: W; a multiple of ``patch_size``.
        patch_size: p.
    """

    def __init__(self, channels: int, height: int, width: int, patch_size: int) -> None:
        super().__init__()
        if height % patch_size or width % patch_size:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of patch_size {patch_size}; "
                "choose a patch size that divides both sides"
            )
        self.channels, self.height, self.width, self.patch_size = (
            channels,
            height,
            width,
            patch_size,
        )
        self.grid = (height // patch_size, width // patch_size)

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def token_dim(self) -> int:
        return self.channels * self.patch_size**2

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        b, p = x.shape[0], self.patch_size
        gh, gw = self.grid
        z = x.reshape(b, self.channels, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)
        z = z.reshape(b, gh * gw, self.token_dim)
        return z, torch.zeros(b, dtype=x.dtype, device=x.device)

    def inverse(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        b, p = z.shape[0], self.patch_size
        gh, gw = self.grid
        x = z.reshape(b, gh, gw, self.channels, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, self.channels, self.height, self.width)
