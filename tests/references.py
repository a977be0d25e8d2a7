"""NumPy/SciPy references shared by the kernel and loss tests, written from the formulas.

Each package's ``references.py`` builds its tables (kernels, samples, magnitudes) on these.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial.distance import cdist

#: The library's default Gaussian bandwidth multipliers.
MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)

FP32_MAX = float(torch.finfo(torch.float32).max)


def pooled_mean_sqdist(x: np.ndarray, y: np.ndarray) -> float:
    """Mean squared distance over the distinct pairs of the pooled rows (the bandwidth rule)."""
    z = np.concatenate([x, y])
    d = cdist(z, z, "sqeuclidean")
    return float(d[~np.eye(len(z), dtype=bool)].mean())


def gaussian_sum(
    d2: np.ndarray, sigma2: float, multipliers: tuple[float, ...] = MULTIPLIERS
) -> np.ndarray:
    """Sum of Gaussian kernels ``exp(-d2 / (2 m sigma2))`` over the multipliers ``m``."""
    return sum(np.exp(-d2 / (2 * m * sigma2)) for m in multipliers)  # type: ignore[return-value]
