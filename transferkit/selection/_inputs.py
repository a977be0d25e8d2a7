"""Inputs shared by the scores: arrays or tensors in, float64 features and dense labels out."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from .._validation import check_positive
from ..metrics import as_numpy_features, as_numpy_labels

#: What every score accepts: a NumPy array or a torch tensor.
ArrayLike = np.ndarray | Tensor


def _one_hot(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(N, C)`` one-hot float64 targets over the classes present, and those classes."""
    classes, index = np.unique(labels, return_inverse=True)
    targets = np.zeros((labels.shape[0], classes.shape[0]), dtype=np.float64)
    targets[np.arange(labels.shape[0]), index.reshape(-1)] = 1.0
    return targets, classes


def labels_array(y: object, name: str, *, num_samples: int) -> np.ndarray:
    """``as_numpy_labels`` with a shortcut for what it would return unchanged.

    A non-empty 1-D int64 array of the right length whose minimum is ``>= 0`` passes
    every check of ``as_numpy_labels`` and comes back as is; anything else goes through
    it, so the errors are the same.
    """
    if (
        isinstance(y, np.ndarray)
        and y.dtype == np.int64
        and y.ndim == 1
        and y.shape[0] == num_samples
        and num_samples > 0
        and y.min() >= 0
    ):
        return y
    return as_numpy_labels(y, name, num_samples=num_samples)


def _features_and_labels(
    features: object, labels: object, *, min_classes: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    f = as_numpy_features(features, "features", min_samples=2)
    y = labels_array(labels, "labels", num_samples=f.shape[0])
    if np.unique(y).shape[0] < min_classes:
        raise ValueError(f"labels: expected at least {min_classes} distinct classes")
    return f, y


def _dense_labels(y: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels renumbered ``0..C-1`` in sorted order, and ``C``."""
    high = int(y.max()) if y.shape[0] else 0
    if high < 4 * y.shape[0] + 64:  # small label values: bincount instead of a sort
        present = np.bincount(y, minlength=high + 1) > 0
        if present.all():
            return y, high + 1
        code = np.cumsum(present) - 1
        return code[y], int(present.sum())
    classes, index = np.unique(y, return_inverse=True)
    return index.reshape(-1), int(classes.shape[0])


def check_folds(folds: object) -> int:
    """Cross-validation folds: an integer of at least 2."""
    value = int(check_positive(folds, "folds", integer=True))
    if value < 2:
        raise ValueError(f"folds: expected at least 2, got {folds}")
    return value
