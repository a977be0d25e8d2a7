"""NumPy/SciPy references and shared kernel tables for the tests of transferkit.kernels."""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist

from transferkit.kernels import (
    GaussianKernel,
    Kernel,
    LaplacianKernel,
    LinearKernel,
    PolynomialKernel,
)

from ..references import FP32_MAX as FP32_MAX  # re-exported for the kernel tests
from ..references import gaussian_sum
from ..references import pooled_mean_sqdist as pooled_mean_sqdist


def reference_kernel(name: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Float64 NumPy/SciPy kernels written from their formulas."""
    d2 = cdist(x, y, "sqeuclidean")
    if name == "gaussian-fixed":
        return gaussian_sum(d2, 1.5**2)
    if name == "gaussian-uneven":
        return gaussian_sum(d2, 1.5**2, (0.3, 1.0, 3.0))
    if name == "gaussian-heuristic":
        return gaussian_sum(d2, pooled_mean_sqdist(x, y))
    if name == "laplacian":
        return np.exp(-np.sqrt(d2) / 2.0)
    if name == "laplacian-heuristic":
        return np.exp(-np.sqrt(d2) / np.sqrt(pooled_mean_sqdist(x, y)))
    if name == "linear":
        return x @ y.T
    if name == "polynomial":
        return (x @ y.T / x.shape[1] + 1.0) ** 3
    raise AssertionError(name)


KERNELS: dict[str, Kernel] = {
    "gaussian-fixed": GaussianKernel(bandwidth=1.5),
    "gaussian-heuristic": GaussianKernel(),
    "gaussian-uneven": GaussianKernel(bandwidth=1.5, multipliers=(0.3, 1.0, 3.0)),
    "laplacian": LaplacianKernel(bandwidth=2.0),
    "laplacian-heuristic": LaplacianKernel(),
    "linear": LinearKernel(),
    "polynomial": PolynomialKernel(degree=3),
}
FIXED = ["gaussian-fixed", "gaussian-uneven", "laplacian", "linear", "polynomial"]

MAGNITUDES = {
    "1e20": (1e20, 1e20),
    "1e30": (1e30, 1e30),
    "1e-20": (1e-20, 1e-20),
    "1e-30": (1e-30, 1e-30),
    "mixed": (1.0, 1e20),  # x of order one, y of order 1e20
}


def extreme_points(magnitude: str, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """fp32-representable points (as float64) at the given magnitudes."""
    rng = np.random.default_rng(seed)
    sx, sy = MAGNITUDES[magnitude]
    x = (rng.normal(size=(9, 4)) * sx).astype(np.float32).astype(np.float64)
    y = ((rng.normal(size=(7, 4)) + 0.5) * sy).astype(np.float32).astype(np.float64)
    return x, y
