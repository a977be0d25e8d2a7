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


@pytest.mark.parametrize("sizes", [(150, 120), (130, 130)])
def test_proxy_a_distance_equals_the_held_out_error_formula(sizes: tuple[int, int]) -> None:
    """Unequal domains: balanced class weights and the balanced error (mean of the two
    domains' error rates); equal domains: the plain fit and error rate."""
    rng = np.random.default_rng(0)
    source = rng.normal(size=(sizes[0], 4))
    target = rng.normal(size=(sizes[1], 4)) + 0.4
    pooled = np.concatenate([source, target])
    domain = np.r_[np.zeros(sizes[0]), np.ones(sizes[1])]
    x_train, x_test, d_train, d_test = train_test_split(
        pooled, domain, test_size=0.5, stratify=domain, random_state=3
    )
    weight = None if sizes[0] == sizes[1] else "balanced"
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight=weight))
    wrong = model.fit(x_train, d_train).predict(x_test) != d_test
    error = (wrong[d_test == 0].mean() + wrong[d_test == 1].mean()) / 2
    if sizes[0] == sizes[1]:
        assert error == pytest.approx(wrong.mean())
    expected = 2 * (1 - 2 * min(error, 0.5))
    assert proxy_a_distance(source, target, seed=3) == pytest.approx(expected)


@pytest.mark.parametrize("classifier", ["logistic", "svm"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_proxy_a_distance_of_one_distribution_is_near_zero_whatever_the_sizes(
    classifier: str, seed: int
) -> None:
    # failed before the fix: 50 vs 500 samples of the same distribution scored ~1.6 of 2
    # (a classifier that always answers "target" has a plain error of 50/550)
    rng = np.random.default_rng(seed)
    small, large = rng.normal(size=(50, 3)), rng.normal(size=(500, 3))
    for source, target in ((small, large), (large, small)):
        value = proxy_a_distance(source, target, classifier=classifier, seed=seed)  # type: ignore[arg-type]
        assert 0.0 <= value < 0.5
    # and a real shift still shows with unequal sizes
    assert proxy_a_distance(small, large + 3.0, classifier=classifier, seed=seed) > 1.8  # type: ignore[arg-type]


def test_proxy_a_distance_depends_only_on_its_seed_and_leaves_inputs_alone() -> None:
    """Guard: no global RNG state is used (the split and the SVM take ``seed``), and the
    input arrays and tensors are not modified."""
    rng = np.random.default_rng(4)
    source = rng.normal(size=(60, 3))
    target = torch.from_numpy(rng.normal(size=(40, 3)) + 0.3).float()
    copies = source.copy(), target.clone()
    values = []
    for global_seed in (0, 1):
        np.random.seed(global_seed)  # noqa: NPY002 (the legacy global state is the point)
        torch.manual_seed(global_seed)
        values.append(
            [proxy_a_distance(source, target, classifier=c, seed=5) for c in ("logistic", "svm")]
        )
    assert values[0] == values[1]
    np.testing.assert_array_equal(source, copies[0])
    assert torch.equal(target, copies[1])


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
