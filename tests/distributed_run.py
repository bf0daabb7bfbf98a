"""Runs :func:`tarflow.train.train` in several local processes, as torchrun would."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch.multiprocessing as mp

from tarflow.config import RunConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process(rank: int, world: int, port: int, config: RunConfig, run_dir: Path, kwargs) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        GLOO_SOCKET_IFNAME="lo",
    )
    from tarflow.train import train

    train(config, run_dir, progress=False, **kwargs)


def train_in_processes(world: int, config: RunConfig, run_dir: Path, **kwargs) -> None:
    """Trains with ``world`` gloo processes on 127.0.0.1; raises if any of them fails."""
    mp.spawn(process, (world, free_port(), config, run_dir, kwargs), nprocs=world, join=True)
