"""Drawing samples for evaluation, and sample grids saved while training.

Samples are drawn noise → data with the exact inverse, denoised with one Tweedie step
when the model was trained with Gaussian noise augmentation, and clamped to [−1, 1].
Every draw uses its own seeded generator, never the global one, so evaluating (or saving
a grid at a checkpoint) does not change the random stream of a training run.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tarflow.config import RunConfig
from tarflow.distributed import owns_batch, sum_over_ranks
from tarflow.image_grid import save_image_grid
from tarflow.models.image_flow import ImageFlow
from tarflow.sampling.denoise import tweedie_denoise
from tarflow.sampling.guidance import Guidance


def denoise_sigma(config: RunConfig) -> float:
    """σ of the Tweedie step for samples of a run: its noise_std, or 0 for uniform noise."""
    return config.train.noise_std if config.train.noise == "gaussian" else 0.0


def balanced_labels(num: int, num_classes: int) -> Tensor:
    """Labels 0, 1, …, C−1, 0, 1, … for ``num`` samples: every class within one of num/C."""
    return torch.arange(num) % num_classes


@torch.no_grad()  # the Tweedie step turns gradients back on for its score
def draw_samples(
    model: ImageFlow,
    num: int,
    sigma: float = 0.0,
    guidance: Guidance | None = None,
    temperature: float = 1.0,
    labels: Tensor | None = None,
    seed: int = 0,
    batch_size: int = 250,
    progress: bool = False,
    share: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Draws ``num`` images in [−1, 1] (noise → data) in batches.

    Under torchrun, with ``share``, the batches are shared round-robin between the
    processes and every process returns all ``num`` images, the same as one process would
    draw (see :mod:`tarflow.distributed`); every process must then call it.

    Arguments:
        model: the flow; class-conditional models draw ``labels``.
        num: number of images.
        sigma: σ of the training noise; > 0 applies :func:`tweedie_denoise` (see
            :func:`denoise_sigma`).
        guidance: classifier-free guidance for class-conditional models.
        temperature: prior temperature.
        labels: the class of each sample; None gives :func:`balanced_labels` for a
            class-conditional model and no labels otherwise.
        seed: seed of the generator of the prior draws.
        batch_size: images per inverse pass.
        progress: show a tqdm bar.
        share: split the work between the processes of a process group; false draws
            everything in this process alone.

    Returns:
        Images (num, C, H, W) clamped to [−1, 1], and their labels (None if
        unconditional).
    """
    if num < 1:
        raise ValueError(f"the number of samples must be >= 1, got {num}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if labels is None and model.num_classes:
        labels = balanced_labels(num, model.num_classes)
    if labels is not None and labels.shape != (num,):
        raise ValueError(f"labels must have shape ({num},), got {tuple(labels.shape)}")

    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    c, size = model.config.channels, model.config.image_size
    images = torch.zeros(num, c, size, size, dtype=param.dtype)
    bar = tqdm(total=num, disable=not progress, desc="sampling", unit="img")
    for index, start in enumerate(range(0, num, batch_size)):
        count = min(batch_size, num - start)
        # Every process draws the noise of every batch, so that the generator stays in
        # step and the samples do not depend on the number of processes.
        z = model.prior_noise(count, temperature, generator)
        if share and not owns_batch(index):
            continue
        y = None if labels is None else labels[start : start + count].to(param.device)
        x = model.inverse(z, y, guidance)
        if sigma > 0:
            x = tweedie_denoise(model, x, sigma, y)
        images[start : start + count] = x.clamp(-1, 1).cpu()
        bar.update(count)
    bar.close()
    model.train(was_training)
    return (sum_over_ranks(images) if share else images), labels


def save_checkpoint_samples(
    model: ImageFlow,
    config: RunConfig,
    run_dir: str | Path,
    step: int,
    per_class: int = 8,
    num: int = 64,
    seed: int = 0,
) -> Path:
    """Writes ``RUN/samples/step-NNNNNNNN.png``, a grid of samples at a training step.

    A class-conditional model gets one row per class with ``per_class`` images; an
    unconditional one a square grid of ``num`` images. The same seed at every step draws
    the same prior noise, so the grids show how one set of samples evolves. The global
    random state is left untouched.

    Arguments:
        model: the weights to sample from (the EMA weights during training).
        config: the run configuration (for the denoising σ).
        run_dir: the run directory.
        step: the training step, used in the file name.
        per_class: images per class of a class-conditional model.
        num: images of an unconditional model.
        seed: seed of the prior draws.

    Returns:
        The path of the PNG.
    """
    if model.num_classes:
        labels = torch.arange(model.num_classes).repeat_interleave(per_class)
        columns = per_class
    else:
        labels, columns = None, max(1, int(num**0.5))
    x, _ = draw_samples(
        model,
        len(labels) if labels is not None else num,
        denoise_sigma(config),
        labels=labels,
        seed=seed,
        share=False,  # drawn by rank 0 alone while training
    )
    path = Path(run_dir) / "samples" / f"step-{step:08d}.png"
    return save_image_grid(x, path, columns)
