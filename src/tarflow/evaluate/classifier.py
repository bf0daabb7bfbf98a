"""A small convolutional classifier of real images, used to judge generated samples.

Samples of a class-conditional model are good when a classifier trained on real data
labels them as the class they were drawn for. The classifier is trained once per dataset
and cached as safetensors with its measured test accuracy beside it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from tarflow.data import ImageDataset, load_dataset, to_unit_range

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$TARFLOW_CACHE``, else ``~/.cache/tarflow``."""
    return Path(os.environ.get("TARFLOW_CACHE", Path.home() / ".cache" / "tarflow"))


class ImageClassifier(nn.Module):
    """Two stages of two 3×3 convolutions with max pooling, then a 256-unit hidden layer,
    for images in [−1, 1]. About 93% test accuracy on Fashion-MNIST after 5 epochs.

    :meth:`features` returns the 256-d penultimate activations; :meth:`forward` the logits.
    """

    # Part of the cache key: cached weights of another architecture are never loaded.
    VERSION = 2

    def __init__(self, channels: int, num_classes: int, image_size: int = 28) -> None:
        super().__init__()

        def stage(c_in: int, c_out: int) -> list[nn.Module]:
            return [
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]

        side = image_size // 4
        self.body = nn.Sequential(
            *stage(channels, 32),
            *stage(32, 64),
            nn.Flatten(),
            nn.Dropout(0.3),
            nn.Linear(64 * side * side, 256),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(256, num_classes))

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@torch.no_grad()
def predict(classifier: ImageClassifier, x: Tensor, batch_size: int = 500) -> Tensor:
    """Predicted class of each image in ``x`` (float, [−1, 1])."""
    classifier.eval()
    return torch.cat(
        [classifier(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]
    )


def accuracy(classifier: ImageClassifier, data: ImageDataset) -> float:
    """Fraction of ``data`` classified correctly."""
    return (predict(classifier, to_unit_range(data.images)) == data.labels).float().mean().item()


def train_classifier(
    train_data: ImageDataset,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> ImageClassifier:
    """Trains :class:`ImageClassifier` with Adam and light augmentation (1-pixel shifts)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    channels, image_size = train_data.images.shape[1], train_data.images.shape[-1]
    model = ImageClassifier(channels, train_data.num_classes, image_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * (len(train_data) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
    model.train()
    bar = tqdm(total=steps, disable=not progress, desc="classifier", unit="step")
    for _ in range(epochs):
        order = torch.randperm(len(train_data), generator=generator)
        for i in range(len(train_data) // batch_size):
            index = order[i * batch_size : (i + 1) * batch_size]
            x = to_unit_range(train_data.images[index])
            dx, dy = torch.randint(-1, 2, (2,), generator=generator).tolist()
            x = torch.roll(x, (dx, dy), dims=(2, 3))
            loss = F.cross_entropy(model(x), train_data.labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


def load_or_train_classifier(
    dataset: str,
    root: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[ImageClassifier, float]:
    """The cached classifier of ``dataset`` and its test accuracy, training it if needed."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    weights, info_path = (
        cache / f"classifier-v{ImageClassifier.VERSION}-{dataset}.safetensors",
        cache / f"classifier-v{ImageClassifier.VERSION}-{dataset}.json",
    )
    test = load_dataset(dataset, root, "test")
    if weights.is_file() and info_path.is_file():
        info = json.loads(info_path.read_text())
        model = ImageClassifier(info["channels"], info["num_classes"], info["image_size"])
        model.load_state_dict(load_file(weights), strict=True)
        return model.eval(), float(info["test_accuracy"])

    train_data = load_dataset(dataset, root, "train")
    log.info("training a %s classifier (cached in %s)", dataset, cache)
    model = train_classifier(train_data, progress=progress)
    test_accuracy = accuracy(model, test)
    cache.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), weights)
    info = {
        "channels": train_data.images.shape[1],
        "num_classes": train_data.num_classes,
        "image_size": train_data.images.shape[-1],
        "test_accuracy": test_accuracy,
    }
    info_path.write_text(json.dumps(info))
    return model, test_accuracy
