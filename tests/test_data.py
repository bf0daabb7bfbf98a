"""Data loading: the IDX reader, Fashion-MNIST, the digits, pixel scaling."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from tarflow.data import (
    dequantize,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    to_pixels,
    to_unit_range,
)
from tarflow.data.fashion_mnist import DEFAULT_ROOT
from tarflow.data.idx import read_idx


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def fake_fashion_mnist(root: Path, n: int = 6, compress: bool = True) -> None:
    suffix = ".gz" if compress else ""
    rng = np.random.default_rng(0)
    for images, labels in [
        ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    ]:
        write_idx(root / (images + suffix), rng.integers(0, 256, (n, 28, 28)), compress)
        write_idx(root / (labels + suffix), rng.integers(0, 10, (n,)), compress)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path, compress):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    write_idx(path, array, compress)
    assert np.array_equal(read_idx(path), array)


def test_truncated_idx_file_is_reported(tmp_path):
    path = tmp_path / "a.idx"
    write_idx(path, np.zeros((4, 5), np.uint8), compress=False)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(path)


def test_non_idx_file_is_reported(tmp_path):
    path = tmp_path / "a.idx"
    path.write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(path)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_from_a_directory(tmp_path, compress):
    fake_fashion_mnist(tmp_path, compress=compress)
    data = load_fashion_mnist(tmp_path, "test")
    assert data.images.shape == (6, 1, 28, 28) and data.images.dtype == torch.uint8
    assert data.labels.dtype == torch.int64 and data.num_classes == 10


def test_missing_dataset_directory_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "nowhere")


def test_missing_dataset_file_names_it(tmp_path):
    fake_fashion_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_fashion_mnist(tmp_path, "test")


def test_unknown_split_and_dataset():
    with pytest.raises(ValueError, match="unknown split"):
        load_digits(split="validation")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("cifar10")


@pytest.mark.skipif(not Path(DEFAULT_ROOT).is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    train, test = load_fashion_mnist(split="train"), load_fashion_mnist(split="test")
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert torch.bincount(test.labels).tolist() == [1000] * 10


def test_digits():
    train, test = load_digits(split="train"), load_digits(split="test")
    assert train.images.shape == (1500, 1, 8, 8) and len(test) == 297
    assert train.images.max() == 255


def test_pixel_scaling():
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = to_unit_range(pixels)
    assert x.min() > -1 and x.max() < 1
    assert torch.equal(to_pixels(x), pixels)
    noisy = dequantize(pixels, torch.Generator().manual_seed(0))
    assert torch.equal(to_pixels(noisy - 1 / 256 + 1 / 256), to_pixels(noisy))
    assert (noisy >= (pixels.float() * 2 / 256 - 1)).all()
    assert (noisy < ((pixels.float() + 1) * 2 / 256 - 1)).all()
