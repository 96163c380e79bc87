"""Small interval helpers (no SciPy in the project): Wilson intervals and Student t quantiles."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from estimation.estimator import Z95, _normal_quantile


def wilson(
    p: NDArray[np.float64], n: NDArray[np.float64], z: float = Z95
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Wilson score interval for proportions ``p`` out of (effective) sizes ``n``.

    Chosen over the Wald interval because it stays inside [0, 1] and keeps its coverage
    for the small and near-0/1 proportions a confusion matrix is full of; with weighted
    users ``n`` is Kish's effective sample size, the usual survey adjustment.
    """
    p = np.asarray(p, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    safe = np.where(n > 0, n, 1.0)
    denom = 1 + z * z / safe
    centre = (p + z * z / (2 * safe)) / denom
    half = z * np.sqrt(np.maximum(p * (1 - p) / safe + z * z / (4 * safe * safe), 0.0)) / denom
    low = np.where(n > 0, np.clip(centre - half, 0.0, 1.0), 0.0)
    high = np.where(n > 0, np.clip(centre + half, 0.0, 1.0), 1.0)
    return low, high


def t_quantile(p: float, df: float) -> float:
    """Student t quantile: exact for 1 and 2 degrees of freedom, else the Cornish–Fisher series
    (Abramowitz & Stegun 26.7.5), within 1e-3 for ``df >= 3`` at the 97.5% point."""
    if df <= 1:
        return math.tan(math.pi * (p - 0.5))
    if df <= 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = _normal_quantile(p)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return float(z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4)


def kish(weights: NDArray[np.float64], groups: NDArray[np.int64], size: int) -> NDArray[np.float64]:
    """Kish effective sample size per group: ``(sum w)^2 / sum w^2`` (``n`` when weights are equal)."""
    total = np.bincount(groups, weights=weights, minlength=size)
    square = np.bincount(groups, weights=weights * weights, minlength=size)
    return np.divide(total * total, square, out=np.zeros(size), where=square > 0)


def condition_text(value: float | None) -> str:
    """A condition number for people: ``inf`` for singular, scientific notation when huge."""
    if value is None or not math.isfinite(value):
        return "inf"
    return f"{value:.1e}" if value > 1e9 else f"{value:,.1f}"
