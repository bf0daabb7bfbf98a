"""In-memory image datasets and the pixel scaling shared by every model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ImageDataset:
    """Images as uint8 (N, C, H, W) with integer labels (N,).

    Arguments:
        images: pixel values 0..255.
        labels: class indices 0..num_classes−1.
        class_names: a name per class.
    """

    images: Tensor
    labels: Tensor
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError("ImageDataset.images must be uint8 of shape (N, C, H, W)")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("ImageDataset.labels must have shape (N,)")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def subset(self, limit: int | None) -> ImageDataset:
        """The first ``limit`` images (all of them for None)."""
        if limit is None:
            return self
        return ImageDataset(self.images[:limit], self.labels[:limit], self.class_names)


def to_unit_range(pixels: Tensor) -> Tensor:
    """uint8 pixels k to the centres of their bins in [−1, 1]: 2(k + 1/2)/256 − 1."""
    return (pixels.float() + 0.5) * (2 / 256) - 1


def dequantize(pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantization x = 2(k + u)/256 − 1, u ~ U[0, 1)."""
    u = torch.rand(pixels.shape, generator=generator, device=pixels.device)
    return (pixels.float() + u) * (2 / 256) - 1


def to_pixels(x: Tensor) -> Tensor:
    """Inverse of :func:`to_unit_range`, rounded and clipped to uint8."""
    return ((x + 1) * 128 - 0.5).round().clamp(0, 255).to(torch.uint8)
