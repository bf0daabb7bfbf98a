"""Evaluation: likelihood in bits per dimension and sample metrics."""

from tarflow.evaluate.bits_per_dim import bits_per_dim, evaluate_bits_per_dim

__all__ = ["bits_per_dim", "evaluate_bits_per_dim"]
