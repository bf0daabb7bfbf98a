"""Fully sharded data parallelism (FSDP2) for image flows, and the state that crosses it.

With ``train.strategy: fsdp`` every Transformer layer is its own ``fully_shard`` unit and
the flow is the root unit: the processes each hold 1/world of every weight, gradient and
optimizer moment, and gather a layer's weights only while it runs. The moving average of
the weights is sharded the same way, so updating it stays local.

The optimizer state crosses between layouts by parameter name (the "FQN" of
``torch.distributed.checkpoint.state_dict``): whole checkpoints number parameters in
``model.parameters()`` order, sharded ones name them, and both resume under either
strategy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from tarflow.models.image_flow import ImageFlow


def shard_model(model: ImageFlow, device: torch.device, world: int) -> None:
    """Applies ``fully_shard`` in place: each Transformer layer, then the whole flow."""
    mesh = init_device_mesh(device.type, (world,))
    for block in model.blocks:
        for layer in block.layers:
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def gathered_model(model: ImageFlow) -> ImageFlow | None:
    """A whole, unsharded copy of a sharded flow, on the CPU, for inference.

    Every process must call it; rank 0 receives the copy and the others None, so no
    process but rank 0 ever holds the whole model.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if not state:
        return None
    with torch.random.fork_rng(devices=[]):  # its random initialisation draws nothing
        copy = ImageFlow(model.config)
    copy.load_state_dict(state, strict=True)
    return copy.eval().requires_grad_(False)


def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: float) -> float:
    """Scales gradients to a global norm of at most ``max_norm``; returns the norm before.

    Sharded gradients contribute their shards, so the norm is the global one."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm if max_norm > 0 else math.inf)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return norm.item()


def named_optimizer_state(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state dict numbered in ``model.parameters()`` order (as
    ``Optimizer.state_dict`` writes it) keyed by parameter names instead."""
    names = [name for name, _ in model.named_parameters()]
    return {
        "state": {names[int(index)]: moments for index, moments in state["state"].items()},
        "param_groups": [
            {**group, "params": [names[int(i)] for i in group["params"]]}
            for group in state["param_groups"]
        ],
    }


def load_whole_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Loads an optimizer state dict saved whole (numbered by parameter) into the optimizer
    of ``model``, sharding its moments when the model is sharded."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    set_optimizer_state_dict(
        model,
        optimizer,
        named_optimizer_state(model, state),
        options=StateDictOptions(full_state_dict=True),
    )
