"""``PrototypeClassifier`` (transferkit/sklearn/_prototype.py): nearest class mean."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

import transferkit as tk
from transferkit.sklearn import PrototypeClassifier


@parametrize_with_checks([PrototypeClassifier(), PrototypeClassifier(metric="euclidean")])
def test_passes_sklearn_estimator_checks(estimator, check):
    check(estimator)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_prototype_classifier_matches_nearest_class_mean_reference(digits, metric):
    x_train, y_train, x_test, _ = digits
    model = PrototypeClassifier(metric=metric).fit(x_train, y_train)
    classes = np.unique(y_train)
    if metric == "cosine":
        unit = x_train / np.linalg.norm(x_train, axis=1, keepdims=True)
        means = np.stack([unit[y_train == c].mean(0) for c in classes])
        means /= np.linalg.norm(means, axis=1, keepdims=True)
        scores = (x_test / np.linalg.norm(x_test, axis=1, keepdims=True)) @ means.T
    else:
        means = np.stack([x_train[y_train == c].mean(0) for c in classes])
        scores = -((x_test[:, None, :] - means[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(model.predict(x_test), classes[scores.argmax(1)])
    np.testing.assert_allclose(model.decision_function(x_test), scores, atol=1e-9)
    proba = model.predict_proba(x_test)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    np.testing.assert_array_equal(proba.argmax(1), scores.argmax(1))


def test_prototype_classifier_learns_digits_from_five_shots():
    task = tk.datasets.digits(None, seed=0).flat()
    x, y = task.few_shot(5, seed=0)
    model = PrototypeClassifier().fit(x.numpy(), y.numpy())
    accuracy = model.score(task.target_test_x.numpy(), task.target_test_y.numpy())
    assert accuracy >= 0.8
