"""Training throughput (images/s) of the real training step, per architecture and precision.

Runs :func:`tarflow.train.trainer.training_step` (forward, backward, clipping, AdamW, EMA)
on Fashion-MNIST batches and reports images/s for each configuration side by side, so
ratios come from one run on the same machine.

    python benchmarks/training.py                 # reference and demo architectures
    python benchmarks/training.py --steps 3 --quick
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tarflow.config import load_config
from tarflow.data import load_dataset
from tarflow.models.image_flow import ImageFlow
from tarflow.train.ema import EMA
from tarflow.train.trainer import EpochSampler, next_batch, training_step

CONFIGS = Path(__file__).parent.parent / "configs"

# The architecture of the published TARFlow recipe at this scale: patch 4, width 128,
# 4 blocks of 4 layers, noise 0.1, batch 256.
REFERENCE = [
    "model.patch_size=4",
    "model.width=128",
    "model.heads=4",
    "model.block_depths=[4, 4, 4, 4]",
    "train.noise_std=0.1",
    "train.batch_size=256",
]


def measure(overrides: list[str], steps: int, warmup: int) -> float:
    config = load_config(CONFIGS / "fashion_mnist.yaml", overrides)
    torch.manual_seed(0)
    model = ImageFlow(config.model)
    ema = EMA(model, config.train.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr)
    data = load_dataset(config.data.dataset, config.data.root, "train")
    generator = torch.Generator().manual_seed(0)
    sampler = EpochSampler(len(data), config.train.batch_size, generator)
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        x, y = next_batch(data, sampler, config, generator)
        training_step(model, optimizer, ema, x, y, config)
    return steps * config.train.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="demo architecture only")
    parser.add_argument("--json", default="benchmarks/results/training.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cases = [("demo (configs/fashion_mnist.yaml)", [])]
    if not args.quick:
        cases.insert(0, ("reference: p4 w128 4x4, batch 256", REFERENCE))
    rows = []
    for name, overrides in cases:
        for precision in ("float32", "bf16"):
            ips = measure([*overrides, f"train.precision={precision}"], args.steps, args.warmup)
            rows.append({"architecture": name, "precision": precision, "images_per_sec": ips})
            print(f"{name:40s} {precision:8s} {ips:8.1f} images/s", flush=True)

    base = rows[0]["images_per_sec"]
    print(f"\n{'architecture':40s} {'precision':9s} {'images/s':>9s} {'vs first':>9s}")
    for r in rows:
        print(
            f"{r['architecture']:40s} {r['precision']:9s} {r['images_per_sec']:9.1f} "
            f"{r['images_per_sec'] / base:8.2f}x"
        )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": args.threads, "steps": args.steps, "torch": torch.__version__}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
