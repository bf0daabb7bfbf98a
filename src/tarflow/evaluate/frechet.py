"""The Fréchet distance between Gaussians fitted to two sets of features.

FID and the classifier-feature distance are both this number: fit N(μ, Σ) to each set of
features and compute

    d² = ‖μ_a − μ_b‖² + tr(Σ_a) + tr(Σ_b) − 2 tr((Σ_a Σ_b)^{1/2}).

Reference: Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a
Local Nash Equilibrium" (2017); Dowson & Landau, "The Fréchet distance between
multivariate normal distributions" (1982).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from torch import Tensor


class FewSamplesWarning(UserWarning):
    """Fewer samples than feature dimensions: the covariance is singular and the distance
    is biased upwards, so it is comparable only with numbers from the same sample count."""


@dataclass
class GaussianStatistics:
    """Mean and covariance of a set of features, with the number of samples behind them.

    Arguments:
        mean: μ, shape (d,), float64.
        covariance: Σ, shape (d, d), float64, the unbiased (N − 1) estimate.
        num_samples: N.
        factor: optionally F (N, d) with Σ = FᵀF, the centred features over √(N − 1);
            :func:`gaussian_statistics` keeps it when N ≤ d, where it makes
            :func:`frechet_distance` an N×N problem instead of a d×d one.
    """

    mean: np.ndarray
    covariance: np.ndarray
    num_samples: int
    factor: np.ndarray | None = None

    def __post_init__(self) -> None:
        d = self.mean.shape[0]
        if self.mean.ndim != 1 or self.covariance.shape != (d, d):
            raise ValueError(
                f"mean must be (d,) and covariance (d, d); got {self.mean.shape} and "
                f"{self.covariance.shape}"
            )
        if self.factor is not None and (self.factor.ndim != 2 or self.factor.shape[1] != d):
            raise ValueError(f"factor must be (N, {d}), got {self.factor.shape}")

    @property
    def dims(self) -> int:
        """Feature dimension d."""
        return self.mean.shape[0]

    def save(self, file: str | Path | BinaryIO, metadata: dict[str, Any]) -> None:
        """Writes the statistics and ``metadata`` (strings and numbers) as ``.npz``."""
        factor = {} if self.factor is None else {"factor": self.factor}
        np.savez(
            file,
            mean=self.mean,
            covariance=self.covariance,
            num_samples=self.num_samples,
            **factor,
            **{f"meta_{k}": np.asarray(v) for k, v in metadata.items()},
        )

    @classmethod
    def load(cls, path: str | Path) -> tuple[GaussianStatistics, dict[str, Any]]:
        """Reads what :meth:`save` wrote; returns the statistics and their metadata."""
        with np.load(path) as f:
            factor = f["factor"] if "factor" in f.files else None
            stats = cls(f["mean"], f["covariance"], int(f["num_samples"]), factor)
            metadata = {k[5:]: f[k].item() for k in f.files if k.startswith("meta_")}
        return stats, metadata


def gaussian_statistics(features: Tensor | np.ndarray) -> GaussianStatistics:
    """Fits N(μ, Σ) to features (N, d) in float64.

    Warning:
        With N ≤ d the covariance has rank below d; a :class:`FewSamplesWarning` is
        issued because the distance then depends strongly on N (published FIDs use
        N = 10,000 or 50,000 against d = 2048).

    Raises:
        ValueError: features that are not 2-D, hold fewer than 2 samples, or are not finite.
    """
    x = features.detach().cpu().double().numpy() if isinstance(features, Tensor) else features
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must have shape (N, d), got {x.shape}")
    n, d = x.shape
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {n}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    if n <= d:
        warnings.warn(
            f"{n} samples for {d}-d features: the covariance is singular and the Fréchet "
            "distance is biased upwards; compare it only with numbers from the same count",
            FewSamplesWarning,
            stacklevel=2,
        )
    mean = x.mean(0)
    factor = (x - mean) / np.sqrt(n - 1) if n <= d else None
    return GaussianStatistics(mean, np.cov(x, rowvar=False), n, factor)


def covariance_factor(covariance: np.ndarray) -> np.ndarray:
    """A matrix F with FᵀF = Σ: the transposed Cholesky factor, or for a singular Σ
    (Cholesky fails) Λ^{1/2}Vᵀ from its eigendecomposition, negative rounding clipped."""
    try:
        return np.linalg.cholesky(covariance).T
    except np.linalg.LinAlgError:
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        return np.sqrt(np.clip(eigenvalues, 0, None))[:, None] * eigenvectors.T


def trace_sqrt_product(a: GaussianStatistics, b: GaussianStatistics) -> float:
    """tr((Σ_a Σ_b)^{1/2}) for symmetric positive semi-definite Σ_a, Σ_b.

    With any factor Σ_a = FᵀF, the product Σ_a Σ_b = FᵀF Σ_b has the same non-zero
    eigenvalues as the symmetric PSD matrix M = F Σ_b Fᵀ, so the trace is Σ_i √λ_i(M),
    computed with ``numpy.linalg.eigvalsh``. This stays real and accurate for singular
    covariances, where a general matrix square root (``scipy.linalg.sqrtm``) returns
    complex parts that must be discarded. F is the stored sample factor when either side
    has one (M is then N×N), else a Cholesky factor. Eigenvalues below zero by rounding
    are clipped to zero.
    """
    if a.factor is None and b.factor is not None:
        a, b = b, a  # tr((Σ_a Σ_b)^{1/2}) is symmetric in a and b
    f = a.factor if a.factor is not None else covariance_factor(a.covariance)
    m = f @ b.covariance @ f.T
    m = (m + m.T) / 2
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(m), 0, None)).sum())


def frechet_distance(a: GaussianStatistics, b: GaussianStatistics) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(μ_a, Σ_a) and N(μ_b, Σ_b).

    The value is what FID reports: ‖μ_a − μ_b‖² + tr Σ_a + tr Σ_b − 2 tr((Σ_a Σ_b)^{1/2}),
    computed in float64 (see :func:`trace_sqrt_product`) and clipped at 0 (rounding can
    leave it at −1e−10). Between two full-rank 2048-d covariances it costs one Cholesky
    and one symmetric eigenvalue problem, a few seconds on two CPU cores; with N ≤ d
    samples on either side, milliseconds.

    Example:
        >>> import numpy as np
        >>> a = GaussianStatistics(np.zeros(2), np.diag([1.0, 4.0]), 100)
        >>> b = GaussianStatistics(np.array([3.0, 0.0]), np.diag([4.0, 4.0]), 100)
        >>> round(frechet_distance(a, b), 6)  # 3² + (1 − 2)² + (2 − 2)²
        10.0

    Raises:
        ValueError: the two sets of statistics have different dimensions.
    """
    if a.dims != b.dims:
        raise ValueError(f"statistics of {a.dims}-d and {b.dims}-d features cannot be compared")
    mean_term = float(np.sum((a.mean - b.mean) ** 2))
    cov_term = float(np.trace(a.covariance) + np.trace(b.covariance))
    return max(0.0, mean_term + cov_term - 2 * trace_sqrt_product(a, b))
