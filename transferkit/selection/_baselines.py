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
    # error_score="raise": a failing fold must not turn the score into NaN with a warning
    scores = cross_val_score(model, features, labels, cv=splits, error_score="raise")
    return float(np.mean(scores))


def _knn_accuracy(
    features: np.ndarray, labels: np.ndarray, k: int, metric: str, folds: int, seed: int
) -> float:
    """Cross-validated k-NN accuracy; a tied vote goes to the tied class nearest the sample.

    scikit-learn's ``KNeighborsClassifier`` breaks a tied vote by the smallest label, so
    the score of the same features would change with the names of the classes.
    """
    from sklearn.model_selection import StratifiedKFold
    from sklearn.neighbors import NearestNeighbors

    index = np.unique(labels, return_inverse=True)[1].reshape(-1)
    smallest = int(np.bincount(index).min())
    if smallest < 2:
        raise ValueError("labels: every class needs at least 2 samples for cross-validation")
    splits = StratifiedKFold(n_splits=min(folds, smallest), shuffle=True, random_state=seed)
    scores = []
    for train, test in splits.split(features, index):
        if k > len(train):
            raise ValueError(
                f"k: expected at most the {len(train)} training samples of a fold, got {k}"
            )
        search = NearestNeighbors(n_neighbors=k, metric=metric, algorithm="brute")
        neighbours = search.fit(features[train]).kneighbors(features[test])[1]  # nearest first
        votes = index[train][neighbours]  # (n_test, k)
        counts = np.zeros((len(test), int(index.max()) + 1), dtype=np.int64)
        np.add.at(counts, (np.arange(len(test))[:, None], votes), 1)
        tied = counts[np.arange(len(test))[:, None], votes] == counts.max(1, keepdims=True)
        predicted = votes[np.arange(len(test)), tied.argmax(1)]  # nearest of the top classes
        scores.append(float(np.mean(predicted == index[test])))
    return float(np.mean(scores))


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
    smaller) of a ``k``-NN classifier (scikit-learn's brute-force neighbour search). A
    tied vote goes to the tied class with the nearest neighbour (scikit-learn's
    ``KNeighborsClassifier`` takes the smallest label, which made the score depend on the
    names of the classes); otherwise the two agree.

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
        ValueError: invalid inputs, a class with a single sample, bad ``k``/``folds``
            (``k`` larger than a fold's training samples).

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> labels = np.repeat([0, 1], 50)
        >>> features = np.eye(2)[labels] + 0.1 * rng.normal(size=(100, 2))
        >>> knn_score(features, labels)
        1.0
    """
    f, y = _features_and_labels(features, labels)
    neighbours = int(check_positive(k, "k", integer=True))
    check_option(metric, "metric", ("cosine", "euclidean"))
    return _knn_accuracy(f, y, neighbours, metric, check_folds(folds), seed)


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
