"""The training loop: maximum likelihood with AdamW, EMA, logging and exact resume."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tarflow.config import RunConfig
from tarflow.data import ImageDataset, dequantize, load_dataset, to_unit_range
from tarflow.evaluate.bits_per_dim import bits_per_dim
from tarflow.evaluate.samples import save_checkpoint_samples
from tarflow.models.image_flow import ImageFlow
from tarflow.train.checkpoint import CheckpointError, load_run, save_checkpoint
from tarflow.train.ema import EMA
from tarflow.train.schedule import warmup_cosine

log = logging.getLogger(__name__)


class EpochSampler:
    """Yields batches of indices, reshuffling every epoch; its state resumes exactly."""

    def __init__(self, size: int, batch_size: int, generator: torch.Generator) -> None:
        if batch_size > size:
            raise ValueError(f"batch_size {batch_size} exceeds the dataset size {size}")
        self.size, self.batch_size, self.generator = size, batch_size, generator
        self.order = torch.randperm(size, generator=generator)
        self.position = 0

    def next(self) -> torch.Tensor:
        if self.position + self.batch_size > self.size:
            self.order = torch.randperm(self.size, generator=self.generator)
            self.position = 0
        batch = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"order": self.order, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order, self.position = state["order"], int(state["position"])


def augment(
    pixels: torch.Tensor, config: RunConfig, generator: torch.Generator
) -> torch.Tensor:
    """uint8 pixels to training inputs: Gaussian noise augmentation or uniform dequantization."""
    if config.train.noise == "uniform":
        return dequantize(pixels, generator)
    x = to_unit_range(pixels)
    noise = torch.randn(x.shape, generator=generator)
    return x + config.train.noise_std * noise


def next_batch(
    data: ImageDataset, sampler: EpochSampler, config: RunConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The next training batch: augmented images and labels, some replaced by the null
    class (probability ``train.label_drop_prob``) so the model also learns p(x)."""
    index = sampler.next()
    x = augment(data.images[index], config, generator)
    if not config.model.num_classes:
        return x, None
    y = data.labels[index]
    drop = torch.rand(y.shape, generator=generator) < config.train.label_drop_prob
    return x, torch.where(drop, config.model.num_classes, y)


def training_step(
    model: ImageFlow,
    optimizer: torch.optim.Optimizer,
    ema: EMA,
    x: torch.Tensor,
    y: torch.Tensor | None,
    config: RunConfig,
) -> tuple[float, float, float]:
    """One maximum-likelihood step: loss = −log p(x | y) / D (nats per dimension).

    Returns:
        The loss, the mean log p(x | y) in nats per image, and the gradient norm before
        clipping.

    Raises:
        FloatingPointError: the loss is not finite; nothing is updated.
    """
    tc = config.train
    with torch.autocast("cpu", torch.bfloat16, enabled=tc.precision == "bf16"):
        log_p = model.log_prob(x, y)
    loss = -log_p.float().mean() / config.model.num_dims
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"the loss became {loss.item()}; lower train.lr or raise train.noise_std, then "
            "resume from the last checkpoint (the weights were not updated)"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(
        model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf
    )
    optimizer.step()
    ema.update(model)
    return loss.item(), log_p.detach().float().mean().item(), grad_norm.item()


def check_data_fits(data: ImageDataset, config: RunConfig) -> None:
    m = config.model
    expected = (m.channels, m.image_size, m.image_size)
    if data.image_shape != expected:
        raise ValueError(
            f"dataset {config.data.dataset} has images of shape {data.image_shape} but the "
            f"model expects {expected}; set model.image_size / model.channels to match"
        )
    if m.num_classes not in (0, data.num_classes):
        raise ValueError(
            f"dataset {config.data.dataset} has {data.num_classes} classes but "
            f"model.num_classes is {m.num_classes}"
        )


def train(
    config: RunConfig,
    run_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    stop_at: int | None = None,
) -> ImageFlow:
    """Trains a TARFlow by maximum likelihood and returns the EMA model.

    Writes ``config.yaml``, ``metrics.jsonl`` and atomic checkpoints into ``run_dir``.
    With ``resume``, continues from the latest checkpoint there: the result is the same as
    one uninterrupted run (same weights, bit for bit on the same machine).

    Arguments:
        config: the run configuration.
        run_dir: output directory.
        resume: continue the run in ``run_dir`` instead of starting anew.
        progress: show a tqdm bar.
        stop_at: end this call after that step, with a checkpoint, as if interrupted (the
            schedule still runs to ``config.train.steps``); resume later to finish.
    """
    run_dir = Path(run_dir)
    tc = config.train
    if tc.threads:
        torch.set_num_threads(tc.threads)

    if resume:
        loaded = load_run(run_dir)
        if loaded.config.model != config.model or loaded.config.data != config.data:
            raise CheckpointError(
                f"the config given differs from the one {run_dir} was trained with in its "
                "model or data section; resume with the run's own config.yaml"
            )
        model, ema = loaded.model, EMA(loaded.ema_model, tc.ema_decay)
        state = loaded.state
    else:
        if (run_dir / "checkpoints" / "latest").exists():
            raise FileExistsError(
                f"{run_dir} already holds a run; pass --resume to continue it or choose "
                "another --out"
            )
        torch.manual_seed(tc.seed)
        model = ImageFlow(config.model)
        ema = EMA(model, tc.ema_decay)
        state = {}

    data = load_dataset(config.data.dataset, config.data.root, "train")
    check_data_fits(data, config)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir / "config.yaml")

    generator = torch.Generator().manual_seed(tc.seed)
    sampler = EpochSampler(len(data), tc.batch_size, generator)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay
    )
    step = 0
    if state:
        step = int(state["step"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        ema.updates = int(state["ema_updates"])
    metrics_path = run_dir / "metrics.jsonl"
    truncate_metrics(metrics_path, step)

    def training_state() -> dict[str, Any]:
        return {
            "optimizer": optimizer.state_dict(),
            "sampler": sampler.state_dict(),
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "ema_updates": ema.updates,
        }

    if stop_at is not None and not step < stop_at <= tc.steps:
        raise ValueError(f"stop_at must lie in {step + 1}..{tc.steps}, got {stop_at}")
    last = tc.steps if stop_at is None else stop_at
    num_dims = config.model.num_dims
    model.train()
    bar = tqdm(total=tc.steps, initial=step, disable=not progress, desc="train", unit="step")
    window_start, window_images = time.perf_counter(), 0
    with open(metrics_path, "a") as metrics:
        while step < last:
            lr = tc.lr * warmup_cosine(step, tc.steps, tc.warmup_steps, tc.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr

            x, y = next_batch(data, sampler, config, generator)
            loss, log_p_mean, grad_norm = training_step(model, optimizer, ema, x, y, config)
            step += 1
            window_images += x.shape[0]

            if step % tc.log_every == 0 or step == last:
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": step,
                    "loss": loss,
                    "bits_per_dim": bits_per_dim(torch.tensor(log_p_mean), num_dims).item(),
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "images_per_sec": window_images / elapsed,
                }
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}",
                    bpd=f"{record['bits_per_dim']:.3f}",
                    img_s=f"{record['images_per_sec']:.0f}",
                )
                window_start, window_images = time.perf_counter(), 0
            bar.update(1)

            if step % tc.checkpoint_every == 0 or step == last:
                save_checkpoint(run_dir, step, config, model, ema.model, training_state())
                if tc.checkpoint_samples:
                    n = tc.checkpoint_samples
                    save_checkpoint_samples(ema.model, config, run_dir, step, n, 10 * n)
    bar.close()
    log.info("finished %d steps; checkpoints in %s", step, run_dir / "checkpoints")
    return ema.model


def truncate_metrics(path: Path, step: int) -> None:
    """Drops metric lines logged after ``step`` (written before an interruption)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in kept))
