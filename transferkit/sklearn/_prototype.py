"""``PrototypeClassifier``: nearest class mean."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .._validation import check_option, check_positive
from ._inputs import drop_unlabelled, labelled_rows, to_host


class PrototypeClassifier(ClassifierMixin, BaseEstimator):  # type: ignore[misc]
    r"""Nearest class mean: each class is the mean of its rows, a sample takes the closest.

    With ``metric="cosine"`` rows are L2-normalised before averaging and the scores are
    cosine similarities to the normalised class means; with ``"euclidean"`` the scores
    are negative squared distances $-\|x - \mu_c\|^2$. On deep features this is a
    strong few-shot classifier (one labelled sample per class suffices).
    ``predict_proba`` is the softmax of the scores divided by ``temperature``.

    Args:
        metric: ``"cosine"`` or ``"euclidean"``.
        temperature: softmax temperature of ``predict_proba`` (> 0); small values give
            sharper probabilities (cosine scores lie in ``[-1, 1]``).
        unlabelled: rows whose label equals this value are skipped by ``fit`` and
            ``score`` (see [`CORAL`][transferkit.sklearn.CORAL]).

    Attributes:
        classes_: the class labels.
        prototypes_: ``(n_classes, D)`` class means (normalised for ``"cosine"``).

    Examples:
        >>> import numpy as np
        >>> X = np.array([[1.0, 0.1], [0.9, 0.0], [0.0, 1.0], [0.2, 0.8]])
        >>> model = PrototypeClassifier(metric="cosine").fit(X, [0, 0, 1, 1])
        >>> model.predict(np.array([[2.0, 0.5], [0.1, 3.0]])).tolist()
        [0, 1]
    """

    def __init__(
        self,
        metric: Literal["cosine", "euclidean"] = "cosine",
        *,
        temperature: float = 1.0,
        unlabelled: Any = None,
    ) -> None:
        self.metric = metric
        self.temperature = temperature
        self.unlabelled = unlabelled

    def _prepare(self, X: np.ndarray) -> np.ndarray:
        if self.metric == "cosine":
            norms = np.linalg.norm(X, axis=1, keepdims=True)
            prepared: np.ndarray = X / np.maximum(norms, 1e-12)
            return prepared
        return X

    def fit(self, X: Any, y: Any) -> PrototypeClassifier:
        """Compute one prototype per class.

        Args:
            X: features, ``(N, D)``.
            y: labels, ``(N,)``.

        Returns:
            The fitted classifier.

        Raises:
            ValueError: for invalid input, an unknown metric or a single class.
        """
        X, y = validate_data(self, to_host(X), to_host(y), dtype=np.float64)
        X, y, _ = drop_unlabelled(X, y, None, self.unlabelled)
        check_classification_targets(y)
        check_option(self.metric, "metric", ("cosine", "euclidean"))
        check_positive(self.temperature, "temperature")
        classes, index = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise ValueError("y: PrototypeClassifier needs at least 2 classes; got 1 class")
        onehot = np.eye(len(classes))[index]
        prepared = self._prepare(X)
        prototypes = (onehot.T @ prepared) / onehot.sum(0)[:, None]
        self.classes_ = classes
        self.prototypes_ = self._prepare(prototypes)
        return self

    def _scores(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        X = self._prepare(validate_data(self, to_host(X), dtype=np.float64, reset=False))
        similarity: np.ndarray = X @ self.prototypes_.T
        if self.metric == "cosine":
            return similarity
        squared = (X**2).sum(1, keepdims=True) - 2 * similarity + (self.prototypes_**2).sum(1)
        distances: np.ndarray = np.maximum(squared, 0.0)
        return -distances

    def decision_function(self, X: Any) -> np.ndarray:
        """Scores: cosine similarities or negative squared distances to the prototypes.

        Args:
            X: features, ``(N, D)``.

        Returns:
            ``(N, n_classes)``; for two classes ``(N,)``, the second score minus the first.
        """
        scores = self._scores(X)
        if len(self.classes_) == 2:
            difference: np.ndarray = scores[:, 1] - scores[:, 0]
            return difference
        return scores

    def predict(self, X: Any) -> np.ndarray:
        """The class of the closest prototype, ``(N,)``."""
        scores = self._scores(X)
        labels: np.ndarray = self.classes_[np.argmax(scores, axis=1)]
        return labels

    def predict_proba(self, X: Any) -> np.ndarray:
        """Softmax of the scores divided by ``temperature``, ``(N, n_classes)``."""
        logits = self._scores(X) / self.temperature
        logits -= logits.max(axis=1, keepdims=True)
        weights = np.exp(logits)
        probabilities: np.ndarray = weights / weights.sum(axis=1, keepdims=True)
        return probabilities

    def score(self, X: Any, y: Any, sample_weight: np.ndarray | None = None) -> float:
        """Accuracy on the labelled rows (rows equal to ``unlabelled`` skipped)."""
        if self.unlabelled is not None:
            X, y, sample_weight = labelled_rows(X, y, sample_weight, self.unlabelled)
        accuracy: float = super().score(X, y, sample_weight=sample_weight)
        return accuracy
