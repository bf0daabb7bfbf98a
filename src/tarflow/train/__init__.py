"""Training: the loop, its schedule, the weight average and checkpoints."""

from tarflow.train.checkpoint import CheckpointError, load_run, save_checkpoint
from tarflow.train.trainer import train

__all__ = ["CheckpointError", "load_run", "save_checkpoint", "train"]
