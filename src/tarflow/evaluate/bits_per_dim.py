"""Test-set likelihood in bits per dimension."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tarflow.data import ImageDataset, dequantize
from tarflow.distributed import owns_batch, sum_over_ranks
from tarflow.models.image_flow import ImageFlow


def bits_per_dim(log_prob: Tensor, num_dims: int, bins: int = 256) -> Tensor:
    """Converts a log-density on [−1, 1]^D (nats) to bits per dimension on the pixel grid.

    bpd = −(log p(x) + D·log(2/bins)) / (D·ln 2); the D·log(2/bins) term is the Jacobian
    of the map from pixel units to [−1, 1].
    """
    return -(log_prob + num_dims * math.log(2 / bins)) / (num_dims * math.log(2))


@torch.no_grad()
def evaluate_bits_per_dim(
    model: ImageFlow,
    data: ImageDataset,
    draws: int = 1,
    batch_size: int = 500,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """Upper bound on the discrete NLL of ``data`` under uniform dequantization.

    With ``draws`` = K > 1 the bound is importance weighted per image,
    log p̂(k) = logsumexp_j log p(x_j) − log K with x_j = 2(k + u_j)/256 − 1, which is
    tighter. Class-conditional models are scored given the true label, log p(x | y).
    Under torchrun the batches are shared between the processes, and every process
    returns the result over all of ``data``.

    Returns:
        ``bits_per_dim`` (mean over images), ``standard_error`` (of that mean),
        ``num_images`` and ``draws``.
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    generator = torch.Generator().manual_seed(seed)
    num_dims = model.config.num_dims
    device = next(model.parameters()).device
    bpd = torch.zeros(len(data), dtype=torch.float64)
    model.eval()
    starts = range(0, len(data), batch_size)
    for index, start in enumerate(tqdm(starts, disable=not progress, desc="bits/dim")):
        pixels = data.images[start : start + batch_size]
        # Every process draws the dequantization noise of every batch (see draw_samples).
        xs = [dequantize(pixels, generator) for _ in range(draws)]
        if not owns_batch(index):
            continue
        y = data.labels[start : start + batch_size].to(device) if model.num_classes else None
        log_ps = torch.stack([model.log_prob(x.to(device), y).double() for x in xs])
        log_p = torch.logsumexp(log_ps, 0) - math.log(draws)
        bpd[start : start + len(pixels)] = bits_per_dim(log_p, num_dims).cpu()
    bpd = sum_over_ranks(bpd)
    stderr = bpd.std().item() / math.sqrt(len(bpd)) if len(bpd) > 1 else float("nan")
    return {
        "bits_per_dim": bpd.mean().item(),
        "standard_error": stderr,
        "num_images": len(bpd),
        "draws": draws,
    }
