"""Independent NumPy references and data shared by the scikit-learn estimator tests."""

from __future__ import annotations

import numpy as np

# The "multi_rbf" multipliers of transferkit.kernels.GaussianKernel (and of the estimators).
LIBRARY_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)


def numpy_kernel(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    gamma: float,
    *,
    multipliers: tuple[float, ...] = (0.5, 1.0, 2.0),
    degree: int = 3,
    coef0: float = 0.5,
) -> np.ndarray:
    """Kernel matrices in scikit-learn's ``gamma``: explicit broadcasting, no GEMM."""
    diff = x[:, None, :] - y[None, :, :]
    squared = (diff**2).sum(-1)
    inner = (x[:, None, :] * y[None, :, :]).sum(-1)
    if name == "rbf":
        return np.exp(-gamma * squared)
    if name == "multi_rbf":
        return sum(np.exp(-gamma * squared / m) for m in multipliers)
    if name == "laplacian":
        return np.exp(-gamma * np.sqrt(squared))
    if name == "linear":
        return inner
    return (gamma * inner + coef0) ** degree


def assert_same_svm(ours, theirs, x_test):
    """Identical predictions and support, decision values equal to rounding."""
    np.testing.assert_array_equal(ours.predict(x_test), theirs.predict(x_test))
    np.testing.assert_array_equal(ours.support_, theirs.support_)
    np.testing.assert_array_equal(ours.n_support_, theirs.n_support_)
    np.testing.assert_allclose(ours.dual_coef_, theirs.dual_coef_, rtol=0, atol=1e-9)
    np.testing.assert_allclose(
        ours.decision_function(x_test), theirs.decision_function(x_test), rtol=0, atol=1e-9
    )


def two_domains(n_source=150, n_target=120, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    source = rng.normal(size=(n_source, dim)) @ rng.normal(size=(dim, dim))
    target = 2.0 * rng.normal(size=(n_target, dim)) @ rng.normal(size=(dim, dim)) + 3.0
    x = np.vstack([source, target])
    y = np.r_[rng.integers(0, 2, n_source), -np.ones(n_target, dtype=int)]
    return x, y, source, target


def small_net():
    import torch

    import transferkit as tk

    torch.manual_seed(0)
    return tk.models.SmallCNN(num_classes=10, width=4, feature_dim=16)
