"""Saving batches of images as one PNG grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from tarflow.data.images import to_pixels


def save_image_grid(
    images: Tensor, path: str | Path, columns: int, scale: int = 2, padding: int = 2
) -> Path:
    """Writes images in [−1, 1], (N, C, H, W) with C = 1 or 3, as a PNG grid.

    Images fill the grid row by row; ``scale`` enlarges each pixel (nearest neighbour).
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W), got {tuple(images.shape)}")
    n, c, h, w = images.shape
    rows = -(-n // columns)
    pixels = to_pixels(images.detach().cpu()).permute(0, 2, 3, 1).numpy()
    cell_h, cell_w = h * scale + padding, w * scale + padding
    grid = np.full((rows * cell_h + padding, columns * cell_w + padding, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        tile = pixels[i].repeat(scale, 0).repeat(scale, 1)
        top, left = padding + r * cell_h, padding + col * cell_w
        grid[top : top + h * scale, left : left + w * scale] = tile
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)
    return path
