"""Sampling: inverse solvers, guidance rules and denoising of noise-augmented samples."""

from tarflow.sampling.denoise import tweedie_denoise
from tarflow.sampling.guidance import Guidance
from tarflow.sampling.solvers import (
    SOLVERS,
    BlockChoice,
    Calibration,
    Solver,
    SolverStats,
    calibrate,
    invert_block,
    load_or_calibrate,
)

__all__ = [
    "SOLVERS",
    "BlockChoice",
    "Calibration",
    "Guidance",
    "Solver",
    "SolverStats",
    "calibrate",
    "invert_block",
    "load_or_calibrate",
    "tweedie_denoise",
]
