"""Processes started by ``torchrun``: the process group, the device, and sharing work.

Every command runs unchanged in one process. Started by ``torchrun`` (``WORLD_SIZE`` > 1)
the processes form a group: gloo when they compute on the CPU, NCCL on GPUs, one GPU per
process (``LOCAL_RANK``). Work that is split by batches goes round-robin (batch i to rank
i mod world); every rank still draws the random numbers of every batch, so the results
do not depend on the number of processes. :func:`sum_over_ranks` then assembles them:
each rank fills the rows it computed into a zero tensor of the full size and the sum over
ranks is exact.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

DEVICES = ("auto", "cpu", "cuda")
T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 outside a process group)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_world_size() -> int:
    """Processes in the group: its size once formed, else ``WORLD_SIZE`` as torchrun sets
    it, else 1."""
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0, the process that writes files and prints; true outside a process group."""
    return rank_and_world()[0] == 0


def process_device(kind: str = "auto") -> torch.device:
    """The device of this process: ``"cpu"``, ``"cuda"`` (the GPU numbered ``LOCAL_RANK``)
    or ``"auto"`` (CUDA when PyTorch sees a GPU, else the CPU).

    Raises:
        ValueError: an unknown kind, CUDA asked for but absent, or more processes on this
            node than GPUs.
    """
    if kind not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {kind!r}")
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but PyTorch sees no CUDA device")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"process {local_rank} of this node has no GPU of its own ({torch.cuda.device_count()}"
            " visible); start at most one process per GPU (torchrun --nproc_per_node)"
        )
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[tuple[int, int]]:
    """Forms the process group when torchrun started several processes and none exists
    yet (gloo for CPU devices, NCCL for GPUs), and takes it down on leaving.

    Yields:
        rank, world size.
    """
    owns = launched_world_size() > 1 and not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        yield rank_and_world()
    finally:
        if owns:
            dist.destroy_process_group()


def owns_batch(index: int) -> bool:
    """Whether batch ``index`` of a round-robin split is this process's to compute."""
    rank, world = rank_and_world()
    return index % world == rank


def sum_over_ranks(tensor: Tensor) -> Tensor:
    """The element-wise sum of ``tensor`` over all processes (``tensor`` itself in one
    process). NCCL reduces on this process's GPU; the result comes back on the input's
    device."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    if dist.get_backend() == "nccl":
        reduced = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(reduced)
        return reduced.to(tensor.device)
    dist.all_reduce(tensor)
    return tensor


def broadcast_from_main(value: T) -> T:
    """Rank 0's ``value`` (any picklable object) in every process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_on_main(work: Callable[[], T], error: type[Exception] = RuntimeError) -> T:
    """Runs ``work`` in rank 0 and hands its result to every process.

    If it raises, rank 0 re-raises the error and every other process raises ``error``
    naming it, instead of waiting for rank 0 at the next collective until the group times
    out. Every process must call it.
    """
    rank, _ = rank_and_world()
    result, failure = None, None
    if rank == 0:
        try:
            result = work()
        except BaseException as err:
            failure = err
    failed = broadcast_from_main(
        None if failure is None else f"{type(failure).__name__}: {failure}"
    )
    if failure is not None:
        raise failure
    if failed is not None:
        raise error(f"rank 0 failed, so this process stops too: {failed}")
    return broadcast_from_main(result)
