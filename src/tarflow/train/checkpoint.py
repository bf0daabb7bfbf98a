"""Atomic checkpoints: safetensors weights, the run config, and the training state.

A run directory holds ``checkpoints/step-NNNNNNNN/`` folders and a ``checkpoints/latest``
file naming the newest complete one. Each checkpoint is written into a temporary folder
and renamed into place, then ``latest`` is replaced atomically, so an interrupted save
never leaves a partial checkpoint behind. A ``manifest.json`` records the SHA-256 of every
file, which loading verifies.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tarflow.config import ConfigError, RunConfig, load_config
from tarflow.models.image_flow import ImageFlow

WEIGHT_FILES = ("model.safetensors", "ema.safetensors")
STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"
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


def atomic_write_text(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    final = root / f"step-{step:08d}"
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
        files = [*WEIGHT_FILES, STATE_FILE, CONFIG_FILE]
        for name in files:
            fsync_file(tmp / name)
        manifest = {"step": step, "sha256": {name: sha256(tmp / name) for name in files}}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
        fsync_file(tmp / MANIFEST_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    expected = {*WEIGHT_FILES, STATE_FILE, CONFIG_FILE}
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
    verify_checkpoint(folder)
    try:
        config = load_config(folder / CONFIG_FILE)
    except ConfigError as err:
        raise CheckpointError(f"checkpoint config in {folder} is invalid: {err}") from err
    model, ema_model = ImageFlow(config.model), ImageFlow(config.model)
    load_weights(model, folder / WEIGHT_FILES[0])
    load_weights(ema_model, folder / WEIGHT_FILES[1])
    state: dict[str, Any] = {}
    if with_state:
        try:
            state = torch.load(folder / STATE_FILE, weights_only=True)
        except Exception as err:
            raise CheckpointError(
                f"cannot read training state {folder / STATE_FILE}: {err}"
            ) from err
    return LoadedRun(folder, config, model, ema_model.eval(), state)
