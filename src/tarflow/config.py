"""Run configuration: dataclasses loaded from YAML with strict, named validation."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tarflow.models.image_flow import ImageFlowConfig


class ConfigError(ValueError):
    """A configuration file or override that cannot be used as written."""


@dataclass
class DataConfig:
    """Which images to train on.

    Arguments:
        dataset: ``"fashion_mnist"`` or ``"digits"`` (scikit-learn's 8×8 digits).
        root: directory of the dataset files; None uses the dataset's default location.
    """

    dataset: str = "fashion_mnist"
    root: str | None = None

    def __post_init__(self) -> None:
        from tarflow.data import DATASETS

        if self.dataset not in DATASETS:
            raise ConfigError(
                f"data.dataset: unknown dataset {self.dataset!r}; choose one of {sorted(DATASETS)}"
            )
        if self.dataset == "digits" and self.root is not None:
            raise ConfigError(
                "data.root: the digits dataset ships with scikit-learn and reads no files; "
                "remove data.root"
            )


@dataclass
class TrainConfig:
    """Optimisation, augmentation and bookkeeping for one training run.

    Arguments:
        steps: optimiser steps in total.
        batch_size: images per step, summed over all processes under torchrun (the global
            batch; it must divide by the number of processes).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW decoupled weight decay.
        betas: AdamW betas.
        warmup_steps: linear warm-up length; cosine decay to ``min_lr_ratio``·lr after.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        grad_clip: maximum global gradient norm (0 turns clipping off).
        ema_decay: decay of the exponential moving average of the weights.
        noise: ``"gaussian"`` (x + σε, for sample quality) or ``"uniform"``
            (dequantization, for likelihood).
        noise_std: σ of the Gaussian augmentation, for data in [−1, 1].
        label_drop_prob: probability of replacing a label by the null class.
        checkpoint_every: steps between checkpoints (a checkpoint is also written at the end).
        checkpoint_samples: images per class in the sample grid saved with every checkpoint
            as ``samples/step-N.png`` (0: none; unconditional models get 10× as many).
        log_every: steps between lines of ``metrics.jsonl``.
        seed: seed of every random choice of the run.
        threads: CPU threads for PyTorch (0 leaves PyTorch's default).
        precision: ``"float32"``, or ``"bf16"`` to run the Transformer under bf16 autocast
            (the flow arithmetic and the loss stay float32).
        max_skipped_steps: consecutive steps with a non-finite loss or gradient after which
            the run stops with an error (each such step is skipped: no weight update).
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"``.
        compile: run the training forward pass through ``torch.compile``.
        activation_checkpointing: recompute each Transformer layer's activations in the
            backward pass instead of storing them (less memory, about one more forward).
        strategy: data parallelism under torchrun: ``"ddp"`` (every process holds the whole
            model; checkpoints are whole) or ``"fsdp"`` (FSDP2 ``fully_shard``: weights,
            gradients and optimizer state sharded over the processes; checkpoints are
            sharded and resume on any number of processes).
    """

    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    noise: str = "gaussian"
    noise_std: float = 0.1
    label_drop_prob: float = 0.1
    checkpoint_every: int = 500
    checkpoint_samples: int = 0
    log_every: int = 10
    seed: int = 0
    threads: int = 0
    precision: str = "float32"
    max_skipped_steps: int = 10
    device: str = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    strategy: str = "ddp"

    def __post_init__(self) -> None:
        checks = [
            (self.steps > 0, "train.steps must be > 0"),
            (self.batch_size > 0, "train.batch_size must be > 0"),
            (0 < self.lr < math.inf, "train.lr must be a finite number > 0"),
            (self.weight_decay >= 0, "train.weight_decay must be >= 0"),
            (all(0 <= b < 1 for b in self.betas), "train.betas must lie in [0, 1)"),
            (0 <= self.warmup_steps, "train.warmup_steps must be >= 0"),
            (0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio must lie in [0, 1]"),
            (self.grad_clip >= 0, "train.grad_clip must be >= 0"),
            (0 <= self.ema_decay < 1, "train.ema_decay must lie in [0, 1)"),
            (self.noise in ("gaussian", "uniform"), "train.noise must be gaussian or uniform"),
            (self.noise_std >= 0, "train.noise_std must be >= 0"),
            (
                self.noise != "gaussian" or self.noise_std > 0,
                "train.noise_std must be > 0 with noise gaussian (without noise the "
                "density of discrete pixels is unbounded; use noise: uniform to dequantize)",
            ),
            (0 <= self.label_drop_prob < 1, "train.label_drop_prob must lie in [0, 1)"),
            (self.checkpoint_every > 0, "train.checkpoint_every must be > 0"),
            (self.checkpoint_samples >= 0, "train.checkpoint_samples must be >= 0"),
            (self.log_every > 0, "train.log_every must be > 0"),
            (self.threads >= 0, "train.threads must be >= 0"),
            (self.precision in ("float32", "bf16"), "train.precision must be float32 or bf16"),
            (self.max_skipped_steps > 0, "train.max_skipped_steps must be > 0"),
            (self.device in ("auto", "cpu", "cuda"), "train.device must be auto, cpu or cuda"),
            (
                self.strategy in ("ddp", "fsdp"),
                f"train.strategy must be ddp or fsdp, got {self.strategy!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.betas = tuple(self.betas)


@dataclass
class RunConfig:
    """Everything a training run needs: data, model and training settings."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ImageFlowConfig = field(default_factory=ImageFlowConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        return build_dataclass(cls, raw, "")

    def save(self, path: str | Path) -> None:
        data = self.to_dict()
        data["train"]["betas"] = list(data["train"]["betas"])
        Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Reads a YAML run configuration and applies ``key.sub=value`` overrides.

    Raises:
        ConfigError: the file is missing or malformed, a key is unknown, or a value has
            the wrong type or range. The message names the key.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; pass a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for item in overrides or []:
        apply_override(raw, item)
    return RunConfig.from_dict(raw)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Sets ``section.key=value`` in a raw config mapping; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(value)


def build_dataclass(cls: type, raw: Any, prefix: str) -> Any:
    """Builds dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"known keys in {prefix.rstrip('.') or 'config'}: {', '.join(fields)}"
        )
    values = {}
    for name, value in raw.items():
        values[name] = coerce(hints[name], value, f"{prefix}{name}")
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from err


def coerce(hint: Any, value: Any, key: str) -> Any:
    """Checks ``value`` against a type hint, converting ints to floats where asked."""
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, key + ".")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(inner[0], value, key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key} must have {len(args)} entries, got {value!r}")
            return tuple(coerce(a, v, key) for a, v in zip(args, value))
        return origin(coerce(args[0], v, key) for v in value)
    if hint is float:
        if isinstance(value, str):
            # PyYAML reads exponents without a dot (1e-4) as strings.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value
