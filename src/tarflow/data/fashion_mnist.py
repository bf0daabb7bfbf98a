"""Fashion-MNIST (Xiao et al., 2017): 70,000 28×28 grayscale images of 10 clothing types."""

from __future__ import annotations

from pathlib import Path

import torch

from tarflow.data.idx import read_idx
from tarflow.data.images import ImageDataset

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
HOW_TO_GET = (
    "install Debian's package with `apt-get install dataset-fashion-mnist` (files land in "
    f"{DEFAULT_ROOT}), or put the four standard IDX files (gzipped or not) in a directory "
    "and pass it as data.root"
)


def find_file(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"Fashion-MNIST file {stem}[.gz] not found in {root}: {HOW_TO_GET}")


def load_fashion_mnist(root: str | Path | None = None, split: str = "train") -> ImageDataset:
    """Loads a split (``"train"``: 60,000 images, ``"test"``: 10,000) from IDX files.

    Raises:
        FileNotFoundError: the directory or a file is missing; the message says how to get
            them.
        ValueError: unknown split, or a file that is corrupt or does not match its partner.
    """
    if split not in FILES:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(FILES)}")
    root = Path(root or DEFAULT_ROOT)
    if not root.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST directory {root} does not exist: {HOW_TO_GET}")
    image_stem, label_stem = FILES[split]
    images = read_idx(find_file(root, image_stem))
    labels = read_idx(find_file(root, label_stem))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Fashion-MNIST {split} files in {root} do not match: images {images.shape}, "
            f"labels {labels.shape}"
        )
    if labels.max() >= len(CLASS_NAMES):
        raise ValueError(f"Fashion-MNIST {split} labels in {root} exceed 9; the file is corrupt")
    return ImageDataset(
        torch.from_numpy(images.copy()).unsqueeze(1),
        torch.from_numpy(labels.astype("int64")),
        CLASS_NAMES,
    )
