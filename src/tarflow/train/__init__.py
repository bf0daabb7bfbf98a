"""Training: the loop, its schedule, the weight average and checkpoints."""

from tarflow.train.checkpoint import CheckpointError, load_run, save_checkpoint
from tarflow.train.trainer import DivergenceError, train

__all__ = ["CheckpointError", "DivergenceError", "load_run", "save_checkpoint", "train"]
