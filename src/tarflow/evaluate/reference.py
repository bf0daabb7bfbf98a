"""Feature statistics of a real data split, computed once and cached.

Inception features of 10,000 test images take most of an hour on a CPU, so the Gaussian
statistics are stored beside the classifier cache (``$TARFLOW_CACHE``, else
``~/.cache/tarflow``) as ``stats-<features>-<dataset>-<split>-<count>.npz``. The file also
records the SHA-256 of the images and the identity of the feature network; when either
differs (other data files, retrained classifier) the statistics are recomputed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

from tarflow.data import ImageDataset, load_dataset
from tarflow.evaluate.classifier import default_cache_dir
from tarflow.evaluate.features import FeatureExtractor, extract_features
from tarflow.evaluate.frechet import GaussianStatistics, gaussian_statistics

log = logging.getLogger(__name__)


def images_sha256(data: ImageDataset) -> str:
    """SHA-256 of the pixels of ``data``, in order."""
    return hashlib.sha256(data.images.contiguous().numpy().tobytes()).hexdigest()


def reference_images(
    dataset: str, split: str, num_images: int | None = None, root: str | None = None
) -> ImageDataset:
    """The first ``num_images`` images of a split (all for None).

    Raises:
        ValueError: ``num_images`` is below 2 or above the size of the split.
    """
    data = load_dataset(dataset, root, split)
    if num_images is not None and not 2 <= num_images <= len(data):
        raise ValueError(
            f"the {dataset} {split} split has {len(data)} images; a reference set needs "
            f"2..{len(data)}, got {num_images}"
        )
    return data.subset(num_images)


def statistics_path(
    extractor: FeatureExtractor, dataset: str, split: str, num_images: int, cache_dir: Path
) -> Path:
    """The cache file of one (features, dataset, split, count) combination."""
    return cache_dir / f"stats-{extractor.name}-{dataset}-{split}-{num_images}.npz"


def reference_statistics(
    extractor: FeatureExtractor,
    dataset: str,
    split: str = "test",
    num_images: int | None = None,
    root: str | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 100,
    progress: bool = False,
) -> GaussianStatistics:
    """Statistics of the features of the first ``num_images`` real images of a split.

    Arguments:
        extractor: the feature network (e.g. :class:`~tarflow.evaluate.fid.InceptionFeatures`).
        dataset: a name of :data:`tarflow.data.DATASETS`.
        split: ``"train"`` or ``"test"``.
        num_images: the first N images of the split; None uses all of them.
        root: the dataset directory (None: its default).
        cache_dir: where statistics are cached (None: ``$TARFLOW_CACHE`` or
            ``~/.cache/tarflow``).
        batch_size: images per forward pass.
        progress: show a tqdm bar while computing.

    Returns:
        The cached statistics when dataset, split, count, pixel hash and feature network
        all match; otherwise freshly computed ones, which replace the cache file.
    """
    data = reference_images(dataset, split, num_images, root)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    path = statistics_path(extractor, dataset, split, len(data), cache)
    expected = {
        "dataset": dataset,
        "split": split,
        "num_images": len(data),
        "images_sha256": images_sha256(data),
        "extractor": extractor.identity,
    }
    if path.is_file():
        stats, metadata = GaussianStatistics.load(path)
        if metadata == expected:
            return stats
        stale = sorted(k for k in expected if metadata.get(k) != expected[k])
        log.info("recomputing %s: its %s changed", path.name, ", ".join(stale))

    log.info("computing %s features of %d %s %s images", extractor.name, len(data), dataset, split)
    stats = gaussian_statistics(extract_features(extractor, data.images, batch_size, progress))
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{path.stem}.", suffix=".npz")
    with os.fdopen(fd, "wb") as f:
        stats.save(f, expected)
    os.replace(tmp, path)
    return stats
