"""scikit-learn's bundled 8×8 handwritten digits: 1,797 images, for fast tests."""

from __future__ import annotations

import numpy as np
import torch

from tarflow.data.images import ImageDataset

# The bundled set has no official split: the first 1,500 images train, the rest test.
TRAIN_SIZE = 1500


def load_digits(root: str | None = None, split: str = "train") -> ImageDataset:
    """Loads the digits (values 0..16 rescaled to 0..255) as a uint8 dataset.

    ``root`` is accepted for a uniform loader signature; the data ships with scikit-learn.
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as err:
        raise ImportError(
            "the digits dataset needs scikit-learn: pip install scikit-learn"
        ) from err
    bunch = sklearn_digits()
    pixels = np.round(bunch.images * (255 / 16)).astype(np.uint8)
    part = slice(0, TRAIN_SIZE) if split == "train" else slice(TRAIN_SIZE, None)
    return ImageDataset(
        torch.from_numpy(pixels[part].copy()).unsqueeze(1),
        torch.from_numpy(bunch.target[part].astype("int64")),
        tuple(str(i) for i in range(10)),
    )
