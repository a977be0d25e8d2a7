from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import transferkit as tk
from transferkit.metrics import proxy_a_distance


def test_proxy_a_distance_equals_the_held_out_error_formula() -> None:
    rng = np.random.default_rng(0)
    source = rng.normal(size=(150, 4))
    target = rng.normal(size=(120, 4)) + 0.4
    pooled = np.concatenate([source, target])
    domain = np.r_[np.zeros(150), np.ones(120)]
    x_train, x_test, d_train, d_test = train_test_split(
        pooled, domain, test_size=0.5, stratify=domain, random_state=3
    )
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    error = np.mean(model.fit(x_train, d_train).predict(x_test) != d_test)
    expected = 2 * (1 - 2 * min(error, 0.5))
    assert proxy_a_distance(source, target, seed=3) == pytest.approx(expected)


@pytest.mark.parametrize("classifier", ["logistic", "svm"])
def test_proxy_a_distance_grows_with_the_shift_and_stays_in_range(classifier: str) -> None:
    rng = np.random.default_rng(1)
    source = rng.normal(size=(200, 3))
    values = [
        proxy_a_distance(source, rng.normal(size=(200, 3)) + s, classifier=classifier)  # type: ignore[arg-type]
        for s in (0.0, 0.5, 4.0)
    ]
    assert all(0.0 <= v <= 2.0 for v in values)
    assert values[0] < values[1] < values[2]
    assert values[0] < 0.3 and values[2] > 1.9


def test_proxy_a_distance_on_digits_separates_a_strong_shift_from_none() -> None:
    same = tk.datasets.digits("none", size=8, seed=0).flat()
    inverted = tk.datasets.digits("invert", size=8, seed=0).flat()
    near = proxy_a_distance(same.source_x, same.target_x)
    far = proxy_a_distance(inverted.source_x, inverted.target_x)
    assert near < 0.5 < 1.9 < far


def test_proxy_a_distance_validates_inputs() -> None:
    x = torch.zeros(10, 3)
    with pytest.raises(ValueError, match="same feature dimension"):
        proxy_a_distance(x, torch.zeros(10, 2))
    with pytest.raises(ValueError, match="classifier"):
        proxy_a_distance(x, x, classifier="tree")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="source_features: expected at least 4 samples"):
        proxy_a_distance(x[:2], x)
    with pytest.raises(ValueError, match="target_features: expected finite"):
        proxy_a_distance(x, torch.full((10, 3), float("nan")))
    with pytest.raises(TypeError, match="source_features"):
        proxy_a_distance([[0.0]], x)  # type: ignore[arg-type]
