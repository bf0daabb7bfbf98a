"""Atomic checkpoints: safetensors weights, the run config, and the training state.

A run directory holds ``checkpoints/step-NNNNNNNN/`` folders and a ``checkpoints/latest``
file naming the newest complete one. Each checkpoint is written into a temporary folder
and renamed into place, then ``latest`` is replaced atomically, so an interrupted save
never leaves a partial checkpoint behind. A ``manifest.json`` records the SHA-256 of every
file, which loading verifies.

Two layouts hold the same content. A whole checkpoint (data parallel or one process) has
``model.safetensors`` and ``ema.safetensors``, and the optimizer inside ``state.pt``. A
sharded checkpoint (``train.strategy: fsdp``) has a ``sharded/`` folder written by every
process together with ``torch.distributed.checkpoint``: weights, averaged weights and
optimizer moments, each process writing its own shards, re-split on loading for any
number of processes. Under several nodes the run directory must be one shared file system.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from tarflow.atomic import atomic_write_text
from tarflow.config import ConfigError, RunConfig, load_config
from tarflow.distributed import rank_and_world, run_on_main
from tarflow.models.image_flow import ImageFlow

WEIGHT_FILES = ("model.safetensors", "ema.safetensors")
STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"
SHARDED_DIR = "sharded"
SHARDED_METADATA = f"{SHARDED_DIR}/.metadata"
KEEP = 2


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or does not fit the model."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    config: RunConfig,
    model: nn.Module,
    ema_model: nn.Module,
    state: dict[str, Any],
) -> Path:
    """Writes the checkpoint of ``step`` atomically and marks it as the latest.

    Arguments:
        run_dir: the run directory.
        step: optimiser steps completed.
        config: the run configuration.
        model: the trained weights.
        ema_model: the averaged weights.
        state: optimiser, sampler, RNG and other training state (torch-serialisable).

    Returns:
        The checkpoint folder.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-step-{step:08d}-"))
    try:
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()}, tmp / WEIGHT_FILES[0]
        )
        save_file(
            {k: v.contiguous() for k, v in ema_model.state_dict().items()}, tmp / WEIGHT_FILES[1]
        )
        torch.save({"step": step, **state}, tmp / STATE_FILE)
        config.save(tmp / CONFIG_FILE)
        return publish(tmp, step, [*WEIGHT_FILES, STATE_FILE, CONFIG_FILE])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_sharded_checkpoint(
    run_dir: str | Path,
    step: int,
    config: RunConfig,
    model: nn.Module,
    ema_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
) -> Path:
    """Writes the sharded checkpoint of ``step`` atomically; every process calls it.

    Each process writes the shards it holds of the weights, the averaged weights and the
    optimizer moments into ``sharded/``; rank 0 adds ``state.pt`` (``state`` minus the
    optimizer), the config and the manifest, and publishes the folder as :func:`save_checkpoint`
    does. Models that are not sharded (one process) write a single shard.

    Returns:
        The checkpoint folder.
    """
    root = Path(run_dir) / "checkpoints"

    def make_folder() -> str:
        root.mkdir(parents=True, exist_ok=True)
        return tempfile.mkdtemp(dir=root, prefix=f".tmp-step-{step:08d}-")

    tmp = Path(run_on_main(make_folder, CheckpointError))
    try:
        tensors = {"model": get_model_state_dict(model), "ema": get_model_state_dict(ema_model)}
        if optimizer.state:  # asking for an empty state would take an optimizer step
            tensors["optimizer"] = get_optimizer_state_dict(model, optimizer)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*assuming the intent is to", UserWarning)
            dcp.save(tensors, checkpoint_id=tmp / SHARDED_DIR)

        def seal() -> Path:
            torch.save({"step": step, **state}, tmp / STATE_FILE)
            config.save(tmp / CONFIG_FILE)
            shards = sorted(str(path.relative_to(tmp)) for path in (tmp / SHARDED_DIR).iterdir())
            return publish(tmp, step, [STATE_FILE, CONFIG_FILE, *shards], layout="sharded")

        return run_on_main(seal, CheckpointError)
    except BaseException:
        if rank_and_world()[0] == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(tmp: Path, step: int, files: list[str], layout: str = "whole") -> Path:
    """Seals a checkpoint written into ``tmp``: fsyncs its files, writes the manifest,
    renames the folder to ``step-NNNNNNNN``, points ``latest`` at it and prunes old ones."""
    root = tmp.parent
    final = root / f"step-{step:08d}"
    for name in files:
        fsync_file(tmp / name)
    manifest = {
        "step": step,
        "layout": layout,
        "sha256": {name: sha256(tmp / name) for name in files},
    }
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    fsync_file(tmp / MANIFEST_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    atomic_write_text(root / "latest", final.name + "\n")

    kept = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in kept[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The folder named by ``checkpoints/latest``.

    Raises:
        CheckpointError: the run has no complete checkpoint.
    """
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        raise CheckpointError(
            f"{run_dir} has no checkpoint ({pointer} is missing); train it first with "
            f"`tarflow train --config CONFIG --out {run_dir}`"
        )
    name = pointer.read_text().strip()
    if not re.fullmatch(r"step-\d{8}", name) or not (root / name).is_dir():
        raise CheckpointError(
            f"{pointer} names {name!r}, which is not a checkpoint of this run; "
            f"{earlier_checkpoints_hint(root, None)}"
        )
    return root / name


def earlier_checkpoints_hint(root: Path, broken: Path | None) -> str:
    """How to fall back by hand: the other kept checkpoints and where to name one."""
    others = sorted(p.name for p in root.glob("step-*") if p.is_dir() and p != broken)
    if not others:
        return "no other checkpoint is kept: retrain"
    return (
        f"to fall back, write the name of a kept checkpoint ({', '.join(others)}) into "
        f"{root / 'latest'}"
    )


def verify_checkpoint(folder: Path) -> dict[str, Any]:
    """Checks every file of a checkpoint against its manifest; returns the manifest."""
    manifest_path = folder / MANIFEST_FILE
    hint = earlier_checkpoints_hint(folder.parent, folder)
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"checkpoint manifest {manifest_path} is unreadable: {err}; {hint}"
        ) from err
    digests = manifest.get("sha256") if isinstance(manifest, dict) else None
    sharded = isinstance(manifest, dict) and manifest.get("layout") == "sharded"
    expected = {STATE_FILE, CONFIG_FILE, *([SHARDED_METADATA] if sharded else WEIGHT_FILES)}
    if not isinstance(digests, dict) or not expected <= set(digests):
        raise CheckpointError(
            f"checkpoint manifest {manifest_path} does not list the SHA-256 of "
            f"{', '.join(sorted(expected))}; {hint}"
        )
    for name, digest in digests.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing; {hint}")
        if sha256(path) != digest:
            raise CheckpointError(
                f"checkpoint file {path} is corrupt or truncated (its SHA-256 does not match "
                f"the manifest); {hint}"
            )
    return manifest


def load_weights(model: nn.Module, path: Path) -> None:
    """Loads a safetensors file into ``model`` strictly, with named errors."""
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read weights {path}: {err}") from err
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"weights {path} do not fit this model (mismatched config?): {err}"
        ) from err


def is_sharded_checkpoint(folder: Path) -> bool:
    return (folder / SHARDED_DIR).is_dir()


def describe(err: BaseException) -> str:
    """One line for an error; for torch.distributed.checkpoint's, the first process's own
    error without the traceback it carries."""
    if isinstance(err, CheckpointException) and err.failures:
        rank, (inner, _) = next(iter(err.failures.items()))
        return f"{type(inner).__name__} in process {rank}: {inner}"
    return f"{type(err).__name__}: {err}".splitlines()[0]


def load_sharded(folder: Path, models: dict[str, nn.Module]) -> None:
    """Loads the named weight sets of a sharded checkpoint into whole models, strictly.

    Every process of a process group must call it (each reads what it needs); outside
    one it reads everything in this process.
    """
    path = folder / SHARDED_DIR
    try:
        stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    except (Exception, CheckpointException) as err:
        raise CheckpointError(
            f"cannot read the sharded checkpoint {path} ({describe(err)}); "
            f"{earlier_checkpoints_hint(folder.parent, folder)}"
        ) from err
    tensors = {}
    for name, model in models.items():
        own = model.state_dict()
        theirs = {key[len(name) + 1 :] for key in stored if key.startswith(name + ".")}
        missing, unexpected = sorted(set(own) - theirs), sorted(theirs - set(own))
        if missing or unexpected:
            raise CheckpointError(
                f"weights {name!r} in {path} do not fit this model (mismatched config?): "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for key, value in own.items():
            size = getattr(stored[f"{name}.{key}"], "size", None)
            if size is not None and tuple(size) != tuple(value.shape):
                raise CheckpointError(
                    f"weights {name!r} in {path} do not fit this model (mismatched config?): "
                    f"{key} has shape {tuple(size)} there and {tuple(value.shape)} here"
                )
        tensors[name] = own
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*assuming the intent is to", UserWarning)
            dcp.load(tensors, checkpoint_id=path)
    except (Exception, CheckpointException) as err:
        raise CheckpointError(
            f"cannot read the weights in {path} ({describe(err)}); "
            f"{earlier_checkpoints_hint(folder.parent, folder)}"
        ) from err
    for name, model in models.items():
        model.load_state_dict(tensors[name], strict=True)


def load_sharded_optimizer(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Loads the optimizer moments of a sharded checkpoint into ``optimizer`` (of
    ``model``, sharded or whole, on any number of processes); every process calls it. A
    checkpoint saved before the first optimizer step holds none and leaves it as it is."""
    stored = dcp.FileSystemReader(folder / SHARDED_DIR).read_metadata().state_dict_metadata
    if not any(key.startswith("optimizer.") for key in stored):
        return
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*assuming the intent is to", UserWarning)
            dcp.load(state, checkpoint_id=folder / SHARDED_DIR)
    except (Exception, CheckpointException) as err:
        raise CheckpointError(
            f"cannot read the optimizer state in {folder / SHARDED_DIR} ({describe(err)}); "
            f"{earlier_checkpoints_hint(folder.parent, folder)}"
        ) from err
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


@dataclass
class LoadedRun:
    """A checkpoint read back: the config, both weight sets, and the training state."""

    folder: Path
    config: RunConfig
    model: ImageFlow
    ema_model: ImageFlow
    state: dict[str, Any]


def load_run(run_dir: str | Path, with_state: bool = True) -> LoadedRun:
    """Loads the latest checkpoint of a run directory.

    Raises:
        CheckpointError: missing, corrupt or mismatched files; the message names the file.
    """
    folder = latest_checkpoint(run_dir)
    # Rank 0 reads and hashes the files for every process.
    run_on_main(lambda: verify_checkpoint(folder), CheckpointError)
    try:
        config = load_config(folder / CONFIG_FILE)
    except ConfigError as err:
        raise CheckpointError(f"checkpoint config in {folder} is invalid: {err}") from err
    model, ema_model = ImageFlow(config.model), ImageFlow(config.model)
    if is_sharded_checkpoint(folder):
        load_sharded(folder, {"model": model, "ema": ema_model})
    else:
        load_weights(model, folder / WEIGHT_FILES[0])
        load_weights(ema_model, folder / WEIGHT_FILES[1])
    state: dict[str, Any] = {}
    if with_state:
        try:
            state = torch.load(folder / STATE_FILE, weights_only=True, map_location="cpu")
        except Exception as err:
            raise CheckpointError(
                f"cannot read training state {folder / STATE_FILE}: {err}"
            ) from err
    return LoadedRun(folder, config, model, ema_model.eval(), state)
