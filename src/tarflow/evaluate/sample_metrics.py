"""Fast sample metrics in the feature space of the library's classifier.

Inception features cost about a third of a second per image on a CPU; the small
classifier of :mod:`tarflow.evaluate.classifier` costs well under a millisecond. Its
256-d features give a Fréchet distance (FD), k-nearest-neighbour precision and recall,
and its predictions the accuracy of class-conditioned samples. These numbers track
sample quality during development; FID remains the number to compare with papers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tarflow.data import to_unit_range
from tarflow.evaluate.classifier import ImageClassifier, load_or_train_classifier, predict
from tarflow.evaluate.features import as_pixels

# A classifier that labels real test images worse than this is not trusted to judge
# samples. The cached classifiers measure 0.886 (digits, 297 test images) and 0.893
# (Fashion-MNIST, 10,000 test images).
MIN_CLASSIFIER_ACCURACY = 0.85


def trusted_classifier(
    dataset: str,
    root: str | None = None,
    cache_dir: str | None = None,
    min_accuracy: float = MIN_CLASSIFIER_ACCURACY,
    progress: bool = True,
) -> tuple[ImageClassifier, float]:
    """The cached classifier of ``dataset`` (trained if needed) and its test accuracy.

    Raises:
        ValueError: its accuracy on the real test split is below ``min_accuracy``; its
            features and predictions would not say much about samples.
    """
    classifier, test_accuracy = load_or_train_classifier(dataset, root, cache_dir, progress)
    if test_accuracy < min_accuracy:
        raise ValueError(
            f"the {dataset} classifier reaches only {test_accuracy:.3f} test accuracy, below "
            f"the {min_accuracy} needed to judge samples; delete its cache files "
            f"(classifier-{dataset}.*) to retrain it"
        )
    return classifier, test_accuracy


@torch.no_grad()
def knn_radii(features: Tensor, k: int, batch_size: int = 1000) -> Tensor:
    """Distance from each point (N, d) to its k-th nearest neighbour among the others."""
    if not 1 <= k < len(features):
        raise ValueError(f"k must lie in 1..{len(features) - 1} for {len(features)} points")
    x = features.double()
    radii = []
    for start in range(0, len(x), batch_size):
        distances = torch.cdist(x[start : start + batch_size], x)
        # The smallest distance is the point to itself (0); the (k+1)-th is the k-th other.
        radii.append(distances.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


@torch.no_grad()
def inside_manifold(
    points: Tensor, manifold: Tensor, radii: Tensor, batch_size: int = 1000
) -> Tensor:
    """Whether each point lies in a ball ‖p − m‖ ≤ r(m) around some manifold point m."""
    manifold = manifold.double()
    inside = []
    for start in range(0, len(points), batch_size):
        distances = torch.cdist(points[start : start + batch_size].double(), manifold)
        inside.append((distances <= radii[None, :]).any(dim=1))
    return torch.cat(inside)


def precision_recall(
    real: Tensor, fake: Tensor, k: int = 3, batch_size: int = 1000
) -> dict[str, float]:
    """k-NN precision and recall of generated features against real ones.

    Each set is taken as the union of balls around its points, each ball reaching the
    point's k-th nearest neighbour in the same set. Precision is the fraction of
    generated points inside the real manifold (are samples realistic?); recall the
    fraction of real points inside the generated manifold (is the data covered?).

    Reference: Kynkäänniemi et al., "Improved Precision and Recall Metric for Assessing
    Generative Models" (2019), who use k = 3 and equal set sizes.

    Arguments:
        real: real features (N, d).
        fake: generated features (M, d).
        k: neighbour index of the ball radii.
        batch_size: rows of each distance block (memory is batch_size × N doubles).

    Returns:
        ``precision`` and ``recall`` in [0, 1].

    Raises:
        ValueError: mismatched feature dimensions, or k not below each set's size.
    """
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"features must be (N, d) with the same d, got {tuple(real.shape)} and "
            f"{tuple(fake.shape)}"
        )
    real_radii = knn_radii(real, k, batch_size)
    fake_radii = knn_radii(fake, k, batch_size)
    precision = inside_manifold(fake, real, real_radii, batch_size).double().mean().item()
    recall = inside_manifold(real, fake, fake_radii, batch_size).double().mean().item()
    return {"precision": precision, "recall": recall}


def conditional_accuracy(
    classifier: ImageClassifier, images: Tensor, labels: Tensor
) -> dict[str, float]:
    """How often the classifier labels class-conditioned samples as their class.

    Images are rounded to 8-bit pixels first, like every other sample metric.

    Returns:
        ``accuracy`` over all images and ``worst_class_accuracy``, the lowest per-class
        accuracy among classes present in ``labels``.
    """
    pixels = as_pixels(images)
    if labels.shape != (len(pixels),):
        raise ValueError(f"labels must have shape ({len(pixels)},), got {tuple(labels.shape)}")
    correct = (predict(classifier, to_unit_range(pixels)) == labels).double()
    per_class = [correct[labels == c].mean().item() for c in labels.unique()]
    return {"accuracy": correct.mean().item(), "worst_class_accuracy": min(per_class)}
