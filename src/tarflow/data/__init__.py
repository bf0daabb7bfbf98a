"""Real image data, held in memory as uint8."""

from __future__ import annotations

from collections.abc import Callable

from tarflow.data.digits import load_digits
from tarflow.data.fashion_mnist import load_fashion_mnist
from tarflow.data.images import ImageDataset, dequantize, to_pixels, to_unit_range

DATASETS: dict[str, Callable[..., ImageDataset]] = {
    "fashion_mnist": load_fashion_mnist,
    "digits": load_digits,
}


def load_dataset(name: str, root: str | None = None, split: str = "train") -> ImageDataset:
    """Loads dataset ``name`` (a key of :data:`DATASETS`) from ``root``."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name](root, split)


__all__ = [
    "DATASETS",
    "ImageDataset",
    "dequantize",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "to_pixels",
    "to_unit_range",
]
