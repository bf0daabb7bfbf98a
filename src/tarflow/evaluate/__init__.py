"""Evaluation: likelihood in bits per dimension and sample metrics.

``report`` (the ``tarflow eval`` table) imports the checkpoint code and ``samples`` the
run config; import them from their own modules.
"""

from tarflow.evaluate.bits_per_dim import bits_per_dim, evaluate_bits_per_dim
from tarflow.evaluate.fid import (
    InceptionFeatures,
    frechet_inception_distance,
    inception_statistics,
)
from tarflow.evaluate.frechet import GaussianStatistics, frechet_distance, gaussian_statistics
from tarflow.evaluate.reference import reference_statistics
from tarflow.evaluate.sample_metrics import conditional_accuracy, precision_recall

__all__ = [
    "GaussianStatistics",
    "InceptionFeatures",
    "bits_per_dim",
    "conditional_accuracy",
    "evaluate_bits_per_dim",
    "frechet_distance",
    "frechet_inception_distance",
    "gaussian_statistics",
    "inception_statistics",
    "precision_recall",
    "reference_statistics",
]
