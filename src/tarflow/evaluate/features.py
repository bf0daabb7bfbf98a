"""Feature extractors for sample metrics, and the checks every image batch passes first.

Real and generated images take the same road to features: they are checked, quantized to
8-bit pixels (as a saved PNG would be) and only then handed to a network. A real image
and a sample that round to the same pixels get the same features.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tarflow.data import to_pixels, to_unit_range
from tarflow.evaluate.classifier import ImageClassifier


class FeatureExtractor(Protocol):
    """What :func:`extract_features` and the reference-statistics cache need.

    Attributes:
        name: a short name used in cache file names, e.g. ``"inception"``.
        identity: changes whenever the weights change, so cached statistics of other
            weights are recomputed.
        dims: feature dimension d.
    """

    name: str
    identity: str
    dims: int

    def features(self, pixels: Tensor) -> Tensor:
        """uint8 pixels (B, C, H, W) → features (B, d)."""
        ...


def as_pixels(images: Tensor) -> Tensor:
    """Checks a batch of images and returns it as uint8 pixels (N, C, H, W).

    Arguments:
        images: uint8 pixels 0..255, or floats in [−1, 1] (the library's scale, see
            :func:`tarflow.data.to_unit_range`), which are rounded to pixels with
            :func:`tarflow.data.to_pixels`. C must be 1 (grayscale) or 3 (RGB).

    Raises:
        ValueError: not (N, C, H, W); no images; C not 1 or 3; floats outside [−1, 1] or
            not finite.
    """
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor of shape (N, C, H, W), got {shape}")
    if images.shape[1] not in (1, 3):
        raise ValueError(
            f"images must have 1 (grayscale) or 3 (RGB) channels, got {images.shape[1]} "
            f"(shape {tuple(images.shape)}; channels come second, as (N, C, H, W))"
        )
    if len(images) == 0:
        raise ValueError("no images given: the batch is empty")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 pixels or floats in [-1, 1], got {images.dtype}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values")
    low, high = images.min().item(), images.max().item()
    if low < -1 or high > 1:
        raise ValueError(
            f"float images must lie in [-1, 1], got values in [{low:.4g}, {high:.4g}]; clamp "
            "samples with x.clamp(-1, 1), and pass pixels 0..255 as uint8"
        )
    return to_pixels(images)


@torch.no_grad()
def extract_features(
    extractor: FeatureExtractor,
    images: Tensor,
    batch_size: int = 100,
    progress: bool = False,
) -> Tensor:
    """Features (N, d) of ``images`` (see :func:`as_pixels` for the accepted forms).

    Raises:
        ValueError: see :func:`as_pixels`.
    """
    pixels = as_pixels(images)
    chunks = []
    bar = tqdm(
        total=len(pixels), disable=not progress, desc=f"{extractor.name} features", unit="img"
    )
    for start in range(0, len(pixels), batch_size):
        batch = pixels[start : start + batch_size]
        chunks.append(extractor.features(batch).float().cpu())
        bar.update(len(batch))
    bar.close()
    return torch.cat(chunks)


class ClassifierFeatures:
    """The 256-d penultimate activations of the library's :class:`ImageClassifier`.

    Pixels k enter the classifier as the bin centres 2(k + 1/2)/256 − 1, the scale it was
    trained on. These features know only the dataset they were trained on: distances
    computed with them are fast and sensitive to class structure, but are not comparable
    across datasets or with published FIDs.
    """

    name = "classifier"
    dims = 256

    def __init__(self, classifier: ImageClassifier) -> None:
        self.classifier = classifier.eval()
        digest = hashlib.sha256()
        for key, value in sorted(classifier.state_dict().items()):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        self.identity = f"classifier-sha256:{digest.hexdigest()[:16]}"

    def features(self, pixels: Tensor) -> Tensor:
        """uint8 pixels (B, C, H, W) → features (B, 256)."""
        return self.classifier.features(to_unit_range(pixels))
