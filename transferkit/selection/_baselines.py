"""Cross-validated baselines: k-NN accuracy and linear-probe accuracy of the features."""

from __future__ import annotations

from typing import Literal

import numpy as np

from .._validation import check_option, check_positive
from ._inputs import ArrayLike, _features_and_labels, check_folds


def _cross_validated_accuracy(
    model: object, features: np.ndarray, labels: np.ndarray, folds: int, seed: int
) -> float:
    """Mean held-out accuracy of ``model`` over stratified folds (fewer for small classes)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    smallest = int(np.bincount(np.unique(labels, return_inverse=True)[1].reshape(-1)).min())
    if smallest < 2:
        raise ValueError("labels: every class needs at least 2 samples for cross-validation")
    splits = StratifiedKFold(n_splits=min(folds, smallest), shuffle=True, random_state=seed)
    return float(np.mean(cross_val_score(model, features, labels, cv=splits)))


def knn_score(
    features: ArrayLike,
    labels: ArrayLike,
    *,
    k: int = 5,
    metric: Literal["cosine", "euclidean"] = "cosine",
    folds: int = 5,
    seed: int = 0,
) -> float:
    """Cross-validated k-nearest-neighbour accuracy of the features (a baseline score).

    Stratified ``folds``-fold cross-validation (fewer folds when the smallest class is
    smaller) of a ``k``-NN classifier (scikit-learn, brute force).

    Args:
        features: target features of one candidate model.
        labels: target class labels (every class at least 2 samples).
        k: neighbours.
        metric: ``"cosine"`` or ``"euclidean"`` distance.
        folds: cross-validation folds (at least 2).
        seed: seed of the fold assignment.

    Returns:
        Mean held-out accuracy in ``[0, 1]``; higher is better.

    Shape:
        - ``features``: ``(N, D)``; ``labels``: ``(N,)``.

    Raises:
        ValueError: invalid inputs, a class with a single sample, bad ``k``/``folds``.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> labels = np.repeat([0, 1], 50)
        >>> features = np.eye(2)[labels] + 0.1 * rng.normal(size=(100, 2))
        >>> knn_score(features, labels)
        1.0
    """
    from sklearn.neighbors import KNeighborsClassifier

    f, y = _features_and_labels(features, labels)
    check_positive(k, "k", integer=True)
    check_option(metric, "metric", ("cosine", "euclidean"))
    check_folds(folds)
    model = KNeighborsClassifier(n_neighbors=k, metric=metric, algorithm="brute")
    return _cross_validated_accuracy(model, f, y, folds, seed)


def linear_probe_score(
    features: ArrayLike,
    labels: ArrayLike,
    *,
    C: float = 1.0,
    folds: int = 5,
    seed: int = 0,
) -> float:
    """Cross-validated accuracy of a linear probe on the features (a baseline score).

    Standardised features, then multinomial logistic regression with inverse
    regularisation ``C``, evaluated by stratified ``folds``-fold cross-validation.

    Args:
        features: target features of one candidate model.
        labels: target class labels (every class at least 2 samples).
        C: inverse regularisation strength.
        folds: cross-validation folds (at least 2).
        seed: seed of the fold assignment.

    Returns:
        Mean held-out accuracy in ``[0, 1]``; higher is better.

    Shape:
        - ``features``: ``(N, D)``; ``labels``: ``(N,)``.

    Raises:
        ValueError: invalid inputs, a class with a single sample, bad ``C``/``folds``.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> labels = np.repeat([0, 1], 50)
        >>> features = np.eye(2)[labels] + 0.1 * rng.normal(size=(100, 2))
        >>> linear_probe_score(features, labels)
        1.0
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    f, y = _features_and_labels(features, labels)
    check_positive(C, "C")
    check_folds(folds)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    return _cross_validated_accuracy(model, f, y, folds, seed)
