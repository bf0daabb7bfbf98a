"""The training loop: maximum likelihood with AdamW, EMA, logging and exact resume.

Data parallelism: under ``torchrun`` (``WORLD_SIZE`` > 1) every process holds the same
random generator and draws the same global batch of ``train.batch_size`` images, with its
augmentation noise and dropped labels, then trains on its own contiguous shard. Each
process's loss is the mean over its shard, so the gradients averaged by
DistributedDataParallel equal the gradient of the mean over the global batch: the run
does not depend on the number of processes beyond float rounding, and its checkpoints
resume on any number of processes. ``train.strategy`` picks how the model is replicated:
``ddp`` keeps a whole copy in every process (checkpoints written whole by rank 0),
``fsdp`` shards it (see :mod:`tarflow.train.parallel`; checkpoints written in shards by
every process).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from tarflow.config import RunConfig
from tarflow.data import ImageDataset, dequantize, load_dataset, to_unit_range
from tarflow.distributed import launched_world_size, process_device, process_group, rank_and_world
from tarflow.evaluate.bits_per_dim import bits_per_dim
from tarflow.evaluate.samples import save_checkpoint_samples
from tarflow.models.image_flow import ImageFlow
from tarflow.train.checkpoint import (
    CheckpointError,
    is_sharded_checkpoint,
    latest_checkpoint,
    load_run,
    load_sharded_optimizer,
    save_checkpoint,
    save_sharded_checkpoint,
)
from tarflow.train.ema import EMA
from tarflow.train.parallel import (
    clip_gradients,
    gathered_model,
    is_sharded,
    load_whole_optimizer_state,
    shard_model,
)
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


def augment(pixels: torch.Tensor, config: RunConfig, generator: torch.Generator) -> torch.Tensor:
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


class DivergenceError(RuntimeError):
    """Too many consecutive training steps had a non-finite loss or gradient."""


class LogLikelihood(nn.Module):
    """log p(x | y) of an image flow as a module's forward pass, nats per image.

    Training calls the flow through this wrapper so that DistributedDataParallel and
    ``torch.compile`` can wrap it; the flow's own parameters are trained and saved.
    """

    def __init__(self, flow: ImageFlow) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        return self.flow.log_prob(x, y)


@dataclass
class StepResult:
    """What one training step measured, averaged over the global batch.

    Attributes:
        loss: −log p(x | y) / D in nats per dimension.
        log_p_mean: mean log p(x | y) in nats per image.
        grad_norm: global gradient norm before clipping.
        skipped: the loss or the gradient was not finite, so nothing was updated.
    """

    loss: float
    log_p_mean: float
    grad_norm: float
    skipped: bool


def training_step(
    model: ImageFlow,
    optimizer: torch.optim.Optimizer,
    ema: EMA,
    x: torch.Tensor,
    y: torch.Tensor | None,
    config: RunConfig,
    objective: nn.Module | None = None,
) -> StepResult:
    """One maximum-likelihood step: loss = −log p(x | y) / D (nats per dimension).

    A step whose loss or gradient norm is not finite is skipped: neither the weights, the
    optimizer state nor the EMA change. In a distributed run every process makes the same
    decision, since both numbers are averaged over all processes first.

    Arguments:
        model: the flow being trained.
        optimizer: its optimizer.
        ema: the moving average of its weights.
        x: this process's images.
        y: their labels, or None.
        config: the run configuration.
        objective: the module computing log p(x | y) for ``model`` (wrapped for data
            parallelism or compiled); None calls ``model.log_prob``.

    Returns:
        The loss, mean log-likelihood and gradient norm, and whether the step was skipped.
    """
    tc = config.train
    objective = objective if objective is not None else LogLikelihood(model)
    with torch.autocast(x.device.type, torch.bfloat16, enabled=tc.precision == "bf16"):
        log_p = objective(x, y)
    log_p = log_p.float()
    loss = -log_p.mean() / config.model.num_dims
    optimizer.zero_grad(set_to_none=True)
    loss.backward()

    stats = torch.stack([loss.detach(), log_p.detach().mean()])
    if dist.is_initialized():
        dist.all_reduce(stats)
        stats /= dist.get_world_size()
    grad_norm = clip_gradients(model.parameters(), tc.grad_clip)
    loss_value, log_p_mean = stats.tolist()
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_value, log_p_mean, grad_norm, skipped=True)
    optimizer.step()
    ema.update(model)
    return StepResult(loss_value, log_p_mean, grad_norm, skipped=False)


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


def training_device(config: RunConfig) -> torch.device:
    """The device of this process: ``train.device``, and under torchrun the GPU numbered
    ``LOCAL_RANK``."""
    try:
        return process_device(config.train.device)
    except ValueError as err:
        raise ValueError(f"train.device: {err}") from err


def shard(batch: Tensor | None, rank: int, world: int) -> Tensor | None:
    """This process's contiguous share of a global batch."""
    if batch is None or world == 1:
        return batch
    size = batch.shape[0] // world
    return batch[rank * size : (rank + 1) * size]


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def train(
    config: RunConfig,
    run_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    stop_at: int | None = None,
) -> ImageFlow | None:
    """Trains a TARFlow by maximum likelihood and returns the EMA model (under
    ``train.strategy: fsdp`` with several processes, rank 0 gets a whole copy on the CPU
    and the other processes None).

    Writes ``config.yaml``, ``metrics.jsonl`` and atomic checkpoints into ``run_dir``.
    With ``resume``, continues from the latest checkpoint there: the result is the same as
    one uninterrupted run (same weights, bit for bit on the same machine and number of
    processes). Started by torchrun with ``WORLD_SIZE`` > 1, it trains data-parallel (gloo
    on CPU, NCCL on GPU; see the module docstring); rank 0 alone writes files and logs.

    A step with a non-finite loss or gradient is skipped, counted (``skipped_steps`` in
    ``metrics.jsonl``) and logged as a warning; no checkpoint is written while the latest
    step was skipped, except at ``stop_at`` or the final step.

    Arguments:
        config: the run configuration.
        run_dir: output directory.
        resume: continue the run in ``run_dir`` instead of starting anew.
        progress: show a tqdm bar.
        stop_at: end this call after that step, with a checkpoint, as if interrupted (the
            schedule still runs to ``config.train.steps``); resume later to finish.

    Raises:
        DivergenceError: ``train.max_skipped_steps`` consecutive steps were skipped; the
            checkpoints written before them are left as they were.
    """
    tc = config.train
    world = launched_world_size()
    if tc.batch_size % world:
        raise ValueError(
            f"train.batch_size {tc.batch_size} (the global batch) must be divisible by the "
            f"number of processes {world}"
        )
    device = training_device(config)
    with process_group(device):
        return train_process(config, Path(run_dir), resume, progress, stop_at, device)


def train_process(
    config: RunConfig,
    run_dir: Path,
    resume: bool,
    progress: bool,
    stop_at: int | None,
    device: torch.device,
) -> ImageFlow | None:
    """The body of :func:`train` in one process, after the process group is set up."""
    tc = config.train
    rank, world = rank_and_world()
    main_process = rank == 0
    sharded_layout = tc.strategy == "fsdp"
    # Sharded models stay on the CPU until fully_shard moves each process's shards to its
    # device: no GPU ever holds the whole model.
    place = torch.device("cpu") if sharded_layout and world > 1 else device
    if tc.threads:
        torch.set_num_threads(tc.threads)

    if resume:
        loaded = load_run(run_dir)
        changed = settings_changed(loaded.config, config)
        fixed = [c for c in changed if not c.startswith("train.")]
        if fixed:
            raise CheckpointError(
                f"the config given differs from the one {run_dir} was trained with "
                f"({'; '.join(fixed)}); resume with the run's own config.yaml"
            )
        altering = [c for c in changed if c.split(":")[0] not in NEUTRAL_SETTINGS]
        if altering:
            log.warning(
                "resuming with train settings that differ from the checkpoint's (%s); the "
                "result will differ from an uninterrupted run",
                "; ".join(altering),
            )
        elif changed:
            log.info("resuming with %s (the same run up to float rounding)", "; ".join(changed))
        model = loaded.model.to(place)
        ema = EMA(loaded.ema_model.to(place), tc.ema_decay)
        state = loaded.state
        if sharded_layout != is_sharded_checkpoint(loaded.folder):
            log.info(
                "resuming a %s checkpoint with train.strategy %s: checkpoints from now on are %s",
                "sharded" if is_sharded_checkpoint(loaded.folder) else "whole",
                tc.strategy,
                "sharded" if sharded_layout else "whole",
            )
    else:
        if (run_dir / "checkpoints" / "latest").exists():
            raise FileExistsError(
                f"{run_dir} already holds a run; pass --resume to continue it or choose "
                "another --out"
            )
        torch.manual_seed(tc.seed)
        model = ImageFlow(config.model).to(place)
        ema = EMA(model, tc.ema_decay)
        state = {}

    data = load_dataset(config.data.dataset, config.data.root, "train")
    check_data_fits(data, config)
    if main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / "config.yaml")

    if sharded_layout and world > 1:
        shard_model(model, device, world)
        shard_model(ema.model, device, world)
    generator = torch.Generator().manual_seed(tc.seed)
    sampler = EpochSampler(len(data), tc.batch_size, generator)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay
    )
    step = skipped_total = skipped_in_a_row = 0
    if state:
        step = int(state["step"])
        if "optimizer" in state:
            load_whole_optimizer_state(model, optimizer, state["optimizer"])
        else:
            load_sharded_optimizer(loaded.folder, model, optimizer)
        sampler.load_state_dict(state["sampler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        ema.updates = int(state["ema_updates"])
        skipped_total = int(state.get("skipped_steps", 0))
        skipped_in_a_row = int(state.get("skipped_in_a_row", 0))
    metrics_path = run_dir / "metrics.jsonl"
    if main_process:
        truncate_metrics(metrics_path, step)

    def training_state() -> dict[str, Any]:
        return {
            **({} if sharded_layout else {"optimizer": optimizer.state_dict()}),
            "sampler": sampler.state_dict(),
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "ema_updates": ema.updates,
            "skipped_steps": skipped_total,
            "skipped_in_a_row": skipped_in_a_row,
        }

    def save(step: int, state: dict[str, Any]) -> None:
        """The checkpoint of ``step`` (every process calls this) and its sample grid."""
        if sharded_layout:
            save_sharded_checkpoint(run_dir, step, config, model, ema.model, optimizer, state)
        elif main_process:
            save_checkpoint(run_dir, step, config, model, ema.model, state)
        if tc.checkpoint_samples:
            ema_model = gathered_model(ema.model) if is_sharded(ema.model) else ema.model
            if main_process:
                assert ema_model is not None
                n = tc.checkpoint_samples
                save_checkpoint_samples(ema_model.to(device), config, run_dir, step, n, 10 * n)

    if stop_at is not None and not step < stop_at <= tc.steps:
        raise ValueError(f"stop_at must lie in {step + 1}..{tc.steps}, got {stop_at}")
    last = tc.steps if stop_at is None else stop_at
    num_dims = config.model.num_dims

    model.set_activation_checkpointing(tc.activation_checkpointing)
    objective: nn.Module = LogLikelihood(model)
    if world > 1 and not sharded_layout:
        objective = DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None
        )
    if tc.compile:
        objective = torch.compile(objective)
    model.train()

    bar = tqdm(
        total=tc.steps,
        initial=step,
        disable=not (progress and main_process),
        desc="train",
        unit="step",
    )
    window_start, window_images = time.perf_counter(), 0
    metrics = open(metrics_path, "a") if main_process else None
    try:
        while step < last:
            lr = tc.lr * warmup_cosine(step, tc.steps, tc.warmup_steps, tc.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr

            x, y = next_batch(data, sampler, config, generator)
            x_local, y_local = shard(x, rank, world), shard(y, rank, world)
            x_local = x_local.to(device, non_blocking=True)
            y_local = None if y_local is None else y_local.to(device, non_blocking=True)
            result = training_step(model, optimizer, ema, x_local, y_local, config, objective)
            step += 1
            window_images += x.shape[0]

            if result.skipped:
                skipped_total += 1
                skipped_in_a_row += 1
                if main_process:
                    log.warning(
                        "step %d skipped: loss %s, gradient norm %s (%d in a row, %d in all)",
                        step,
                        result.loss,
                        result.grad_norm,
                        skipped_in_a_row,
                        skipped_total,
                    )
                if skipped_in_a_row >= tc.max_skipped_steps:
                    raise DivergenceError(divergence_message(run_dir, step, skipped_in_a_row))
            else:
                skipped_in_a_row = 0

            if metrics is not None and (step % tc.log_every == 0 or step == last):
                elapsed = time.perf_counter() - window_start
                bpd = bits_per_dim(torch.tensor(result.log_p_mean), num_dims).item()
                record = {
                    "step": step,
                    "loss": finite_or_none(result.loss),
                    "bits_per_dim": finite_or_none(bpd),
                    "lr": lr,
                    "grad_norm": finite_or_none(result.grad_norm),
                    "images_per_sec": window_images / elapsed,
                    "skipped_steps": skipped_total,
                }
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                bar.set_postfix(
                    loss=f"{result.loss:.3f}",
                    bpd=f"{bpd:.3f}",
                    img_s=f"{record['images_per_sec']:.0f}",
                )
                window_start, window_images = time.perf_counter(), 0
            bar.update(1)

            due = step % tc.checkpoint_every == 0 and skipped_in_a_row == 0
            if due or step == last:
                save(step, training_state())
        if world > 1:
            dist.barrier()
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
        model.set_activation_checkpointing(False)
    if main_process:
        log.info("finished %d steps; checkpoints in %s", step, run_dir / "checkpoints")
    if is_sharded(ema.model):
        return gathered_model(ema.model)
    return ema.model


# Train settings that change how a run is computed or recorded, not what it computes: a
# resume may change them and still continue the same run (up to float rounding).
NEUTRAL_SETTINGS = {
    f"train.{name}"
    for name in (
        "strategy",
        "device",
        "threads",
        "compile",
        "activation_checkpointing",
        "checkpoint_every",
        "checkpoint_samples",
        "log_every",
        "max_skipped_steps",
    )
}


def settings_changed(before: RunConfig, after: RunConfig) -> list[str]:
    """``section.key: old -> new`` for every config entry that differs."""
    old, new = before.to_dict(), after.to_dict()
    return [
        f"{section}.{key}: {old[section][key]!r} -> {new[section][key]!r}"
        for section in new
        for key in new[section]
        if old[section][key] != new[section][key]
    ]


def divergence_message(run_dir: Path, step: int, count: int) -> str:
    try:
        kept = f"the latest checkpoint, {latest_checkpoint(run_dir).name}, is intact"
    except CheckpointError:
        kept = "no checkpoint was written yet"
    return (
        f"training diverged: {count} consecutive steps up to step {step} had a non-finite "
        f"loss or gradient and were skipped; {kept}. Lower train.lr or train.grad_clip, or "
        "raise train.noise_std, then resume with --resume (or raise train.max_skipped_steps)"
    )


def truncate_metrics(path: Path, step: int) -> None:
    """Drops metric lines logged after ``step`` and lines cut short, both left behind by an
    interruption."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the interruption
        if isinstance(record, dict) and record.get("step", step + 1) <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))
