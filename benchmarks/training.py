"""Training throughput (images/s) and memory of the real training step, side by side.

Runs :func:`tarflow.train.trainer.training_step` (forward, backward, clipping, AdamW, EMA)
on Fashion-MNIST batches for each architecture and precision, then, on the demo
architecture, with activation checkpointing, with ``torch.compile`` and on 2 data-parallel
processes, replicated (DDP) and sharded (FSDP2) (gloo on CPU, NCCL on GPU; same global
batch). Ratios come from one run on the
same machine.

Each case runs in a fresh process (under torchrun for 2 processes), so its memory figure
is its own. Memory is the peak: on CPU, the growth of the process's peak resident set
(``resource.getrusage().ru_maxrss``, rank 0) from just before the first step to the end;
on CUDA, ``torch.cuda.max_memory_allocated`` over the steps. "warm-up s" is the time of the
untimed first steps, which includes compilation.

    python benchmarks/training.py                 # reference and demo architectures
    python benchmarks/training.py --steps 3 --quick
    python benchmarks/training.py --device cuda --threads 8 --json benchmarks/results/gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from tarflow.config import load_config
from tarflow.data import load_dataset
from tarflow.models.image_flow import ImageFlow
from tarflow.train.ema import EMA
from tarflow.train.parallel import shard_model
from tarflow.train.trainer import (
    EpochSampler,
    LogLikelihood,
    next_batch,
    shard,
    training_device,
    training_step,
)

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
DEMO = "demo (configs/fashion_mnist.yaml)"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(overrides: list[str], steps: int, warmup: int) -> dict[str, float]:
    """Times ``steps`` training steps after ``warmup`` untimed ones, in this process (one
    rank of several when started by torchrun)."""
    config = load_config(CONFIGS / "fashion_mnist.yaml", overrides)
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = training_device(config)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    model = ImageFlow(config.model).to(device)
    ema = EMA(model, config.train.ema_decay)
    model.set_activation_checkpointing(config.train.activation_checkpointing)
    fsdp = world > 1 and config.train.strategy == "fsdp"
    if fsdp:
        shard_model(model, device, world)
        shard_model(ema.model, device, world)
    objective: torch.nn.Module = LogLikelihood(model)
    if world > 1 and not fsdp:
        ids = [device.index] if device.type == "cuda" else None
        objective = DistributedDataParallel(objective, device_ids=ids)
    if config.train.compile:
        objective = torch.compile(objective)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr)
    data = load_dataset(config.data.dataset, config.data.root, "train")
    generator = torch.Generator().manual_seed(0)
    sampler = EpochSampler(len(data), config.train.batch_size, generator)

    rss_before = peak_rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    begin = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        x, y = next_batch(data, sampler, config, generator)
        x, y = shard(x, rank, world).to(device), shard(y, rank, world)
        y = None if y is None else y.to(device)
        training_step(model, optimizer, ema, x, y, config, objective)
    end = time.perf_counter()
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        memory = peak_rss_mib() - rss_before
    if world > 1:
        dist.destroy_process_group()
    return {
        "images_per_sec": steps * config.train.batch_size / (end - start),
        "warmup_seconds": start - begin,
        "peak_memory_mib": memory,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(overrides: list[str], processes: int, args: argparse.Namespace) -> dict[str, Any]:
    """Runs :func:`measure` in a fresh process, or under torchrun for several."""
    threads = max(1, args.threads // processes)
    case = ["--case", json.dumps(overrides), "--steps", str(args.steps)]
    case += ["--warmup", str(args.warmup), "--threads", str(threads)]
    if processes == 1:
        command = [sys.executable, __file__, *case]
    else:
        torchrun = [sys.executable, "-m", "torch.distributed.run"]
        torchrun += [f"--nproc_per_node={processes}", "--master_addr=127.0.0.1"]
        command = [*torchrun, f"--master_port={free_port()}", __file__, *case]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GLOO_SOCKET_IFNAME": "lo"}
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of all processes")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="demo architecture only")
    parser.add_argument("--json", default="benchmarks/results/training.json")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.case is not None:
        result = measure(json.loads(args.case), args.steps, args.warmup)
        if int(os.environ.get("RANK", 0)) == 0:
            print(json.dumps(result), flush=True)
        return

    cases = [(DEMO, [])]
    if not args.quick:
        cases.insert(0, ("reference: p4 w128 4x4, batch 256", REFERENCE))
    plan = [
        (name, "plain", [*overrides, f"train.precision={precision}"], 1)
        for name, overrides in cases
        for precision in ("float32", "bf16")
    ]
    plan += [
        (DEMO, "activation checkpointing", ["train.activation_checkpointing=true"], 1),
        (DEMO, "torch.compile", ["train.compile=true"], 1),
    ]
    if args.device == "cuda":
        plan.append((DEMO, "torch.compile", ["train.compile=true", "train.precision=bf16"], 1))
    if args.device == "cpu" or torch.cuda.device_count() >= 2:
        plan.append((DEMO, "2 processes DDP", [], 2))
        plan.append((DEMO, "2 processes FSDP", ["train.strategy=fsdp"], 2))
    rows = []
    for name, variant, overrides, processes in plan:
        overrides = [*overrides, f"train.device={args.device}"]
        precision = "bf16" if "train.precision=bf16" in overrides else "float32"
        row = {"architecture": name, "variant": variant, "precision": precision}
        row |= {"processes": processes, **run_case(overrides, processes, args)}
        rows.append(row)
        print(
            f"{name:36s} {variant:24s} {precision:8s} {row['images_per_sec']:8.1f} images/s",
            flush=True,
        )

    base = rows[0]["images_per_sec"]
    memory = "peak MiB" if args.device == "cuda" else "+RSS MiB"
    print(
        f"\n{'architecture':36s} {'variant':24s} {'precision':9s} {'images/s':>9s} "
        f"{'vs first':>9s} {'warm-up s':>9s} {memory:>9s}"
    )
    for r in rows:
        print(
            f"{r['architecture']:36s} {r['variant']:24s} {r['precision']:9s} "
            f"{r['images_per_sec']:9.1f} {r['images_per_sec'] / base:8.2f}x "
            f"{r['warmup_seconds']:9.1f} {r['peak_memory_mib']:9.0f}"
        )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "device": args.device,
        "torch": torch.__version__,
        "memory": "CUDA max_memory_allocated"
        if args.device == "cuda"
        else "growth of ru_maxrss (rank 0) over the steps",
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
