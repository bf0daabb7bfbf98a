"""Sampling: guidance rules and denoising of noise-augmented samples."""

from tarflow.sampling.denoise import tweedie_denoise
from tarflow.sampling.guidance import Guidance

__all__ = ["Guidance", "tweedie_denoise"]
