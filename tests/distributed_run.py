"""Runs functions in several local gloo processes, as torchrun would start them."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from tarflow.config import RunConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process(rank: int, world: int, port: int, function: Callable, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        GLOO_SOCKET_IFNAME="lo",
    )
    function(*args)


def run_in_processes(world: int, function: Callable, *args: Any) -> None:
    """Calls ``function(*args)`` in ``world`` processes with torchrun's environment
    (127.0.0.1, a free port); raises if any of them fails. ``function`` must be importable
    by name, and forms the process group itself."""
    mp.spawn(process, (world, free_port(), function, args), nprocs=world, join=True)


def train_process(config: RunConfig, run_dir: Path, kwargs: dict[str, Any]) -> None:
    from tarflow.train import train

    train(config, run_dir, progress=False, **kwargs)


def train_in_processes(world: int, config: RunConfig, run_dir: Path, **kwargs: Any) -> None:
    """Trains with ``world`` gloo processes; raises if any of them fails."""
    run_in_processes(world, train_process, config, run_dir, kwargs)


def cli_process(argv: list[str]) -> None:
    from tarflow.cli import main

    if main(argv) != 0:
        raise RuntimeError(f"tarflow {' '.join(argv)} failed")


def cli_in_processes(world: int, argv: list[str]) -> None:
    """Runs ``tarflow ARGV`` in ``world`` processes, as ``torchrun -m tarflow`` would."""
    run_in_processes(world, cli_process, argv)


def failing_main_process(out: Path) -> None:
    """Rank 0 fails inside run_on_main; every rank records what it raised."""
    import torch.distributed as dist

    from tarflow.distributed import run_on_main

    dist.init_process_group("gloo")
    try:

        def work() -> None:
            raise OSError("disk full")

        run_on_main(work)
    except BaseException as err:
        (out / f"rank{dist.get_rank()}.txt").write_text(f"{type(err).__name__}: {err}")
    finally:
        dist.destroy_process_group()
