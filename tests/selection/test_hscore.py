"""H-score: Bao et al.'s score, the Ledoit-Wolf regularised one, and its chance level."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sklearn.covariance import LedoitWolf
from sklearn.datasets import load_digits

from tests.selection._data import SEEDS, informative_features, noise_candidates
from transferkit import selection


def reference_hscore(f: np.ndarray, y: np.ndarray) -> float:
    """The TLlib / Bao et al. formulation with a loop over classes."""
    cov_f = np.cov(f, rowvar=False)
    g = np.zeros_like(f)
    for c in np.unique(y):
        g[y == c] = f[y == c].mean(axis=0)
    cov_g = np.cov(g, rowvar=False)
    return float(np.trace(np.linalg.pinv(cov_f, rcond=1e-15) @ cov_g))


@pytest.mark.parametrize(("n", "d", "classes"), [(30, 3, 2), (100, 8, 5), (300, 20, 10)])
def test_hscore_equals_class_loop_reference(n, d, classes) -> None:
    rng = np.random.default_rng(n)
    f, y = informative_features(rng, n, d, classes)
    assert selection.hscore(f, y, shrinkage=None) == pytest.approx(reference_hscore(f, y), rel=1e-8)


@given(seed=st.integers(0, 10_000))
def test_hscore_is_invariant_to_invertible_affine_maps(seed: int) -> None:
    rng = np.random.default_rng(seed)
    f, y = informative_features(rng, 60, 3, 3)
    a = rng.normal(size=(3, 3)) + 3 * np.eye(3)
    mapped = f @ a + rng.normal(size=3)
    assert selection.hscore(mapped, y, shrinkage=None) == pytest.approx(
        selection.hscore(f, y, shrinkage=None), rel=1e-6
    )


def test_hscore_is_bounded_by_classes_minus_one() -> None:
    rng = np.random.default_rng(1)
    f, y = informative_features(rng, 200, 6, 4)
    assert 0.0 <= selection.hscore(f, y, shrinkage=None) <= 3.0 + 1e-9
    assert selection.hscore(np.eye(4)[y], y, shrinkage=None) == pytest.approx(3.0)
    # the Ledoit-Wolf regularised score only shrinks it
    assert 0.0 <= selection.hscore(f, y) <= selection.hscore(f, y, shrinkage=None)


@pytest.mark.parametrize("seed", SEEDS)
def test_unregularised_hscore_ranks_high_dimensional_noise_first_and_warns(digits, seed) -> None:
    # the failure the Ledoit-Wolf shrinkage fixes: noise with D >= N - 1 reaches C - 1
    candidates, labels = noise_candidates(digits, seed, "features")
    with pytest.warns(UserWarning, match="shrinkage='ledoit_wolf'"):
        value = selection.hscore(candidates["noise, D >= N"], labels, shrinkage=None)
    assert value == pytest.approx(9.0, abs=1e-6)
    assert value > selection.hscore(candidates["digits pixels"], labels, shrinkage=None)


def reference_regularised_hscore(f: np.ndarray, y: np.ndarray) -> float:
    """Ibrahim et al. (2022) as in TLlib: scikit-learn's Ledoit-Wolf, a loop over classes."""
    f = f - f.mean(0, keepdims=True)
    lw = LedoitWolf(assume_centered=False).fit(f)
    alpha = lw.shrinkage_
    g = np.zeros_like(f)
    for c in np.unique(y):
        g[y == c] = f[y == c].mean(0)
    cov_g = np.cov(g, rowvar=False)
    return float(np.trace(np.linalg.pinv(lw.covariance_, rcond=1e-15) @ ((1 - alpha) * cov_g)))


@pytest.mark.parametrize(("n", "d"), [(50, 3), (200, 40), (60, 60), (40, 300)])
def test_regularised_hscore_equals_the_reference_up_to_the_unbiased_factor(n, d) -> None:
    rng = np.random.default_rng(n + d)
    y = rng.integers(0, 4, size=n)
    f = 0.7 * rng.normal(size=(4, d))[y] + rng.normal(size=(n, d)) * rng.uniform(0.5, 2, d)
    expected = reference_regularised_hscore(f, y) * (n - 1) / n
    assert selection.hscore(f, y) == pytest.approx(expected, rel=1e-7)
    # a fixed shrinkage of 0 is the unregularised score
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = selection.hscore(f, y, shrinkage=None)
        assert selection.hscore(f, y, shrinkage=0.0) == pytest.approx(plain, rel=1e-7)
    assert selection.hscore(f, y, shrinkage=1.0) == 0.0


def test_hscore_rejects_bad_shrinkage() -> None:
    f, y = np.eye(3)[[0, 1, 2, 0, 1, 2]], np.array([0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match="shrinkage"):
        selection.hscore(f, y, shrinkage=1.5)
    with pytest.raises(ValueError, match="shrinkage"):
        selection.hscore(f, y, shrinkage="oas")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="shrinkage"):
        selection.hscore(f, y, shrinkage=True)  # type: ignore[arg-type]
    for estimator in ("empirical", "leave_one_out"):
        for bad in (np.nan, np.inf):
            probs = np.array([[1.0, 0.0, 0.0]] * 6)
            probs[2] = [1.0, 0.0, bad]  # the other entries still sum to 1
            with pytest.raises(ValueError, match="source_probs: expected finite"):
                selection.leep(probs, y, estimator=estimator)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="source_probs: expected rows that sum to 1"):
            selection.leep(np.full((6, 3), 0.5), y, estimator=estimator)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="source_probs: expected probabilities >= 0"):
            selection.leep(np.array([[1.5, -0.5]] * 6), y, estimator=estimator)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="estimator"):
        selection.leep(np.full((6, 2), 0.5), y, estimator="loo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="estimator"):
        selection.nce(y, y, estimator="plugin")  # type: ignore[arg-type]


@given(seed=st.integers(0, 10_000), scale=st.floats(0.01, 100.0))
def test_regularised_hscore_is_invariant_to_rotation_translation_scale_and_order(
    seed: int, scale: float
) -> None:
    rng = np.random.default_rng(seed)
    n, d = 40, int(rng.integers(2, 60))  # both D < N and D > N
    y = rng.integers(0, 3, size=n)
    f = rng.normal(size=(3, d))[y] + rng.normal(size=(n, d))
    rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
    moved = scale * f @ rotation + rng.normal(size=d)
    order = rng.permutation(n)
    expected = selection.hscore(f, y)
    assert selection.hscore(moved, y) == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert selection.hscore(f[order], (y[order] + 5) * 2) == pytest.approx(expected, rel=1e-9)


def chance_level_by_simulation(n: int, d: int, num_classes: int, seed: int) -> float:
    """Mean regularised H-score of Gaussian noise over random labellings (Monte Carlo)."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(20):
        labels = rng.permutation(np.arange(n) % num_classes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values.append(selection.hscore(rng.normal(size=(n, d)), labels))
    return float(np.mean(values))


@pytest.mark.parametrize("seed", SEEDS)
def test_hscore_warns_where_noise_of_many_dimensions_outscores_real_features(seed) -> None:
    """D >> N with few samples per class: even the regularised score of pure noise nears
    C - 1 and can rank above digit pixels; hscore says so, with the chance level."""
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(y), size=30, replace=False)
    labels = y[pick]
    noise = 100.0 * rng.normal(size=(30, 3000))
    with pytest.warns(UserWarning, match=r"independent of the labels would score about"):
        noisy = selection.hscore(noise, labels)
    assert noisy > 0.5 * (len(np.unique(labels)) - 1)  # far from 0: the reason to warn
    expected = chance_level_by_simulation(30, 3000, len(np.unique(labels)), seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        selection.hscore(noise, labels)
    stated = float(re.search(r"score about ([\d.]+)", str(caught[0].message)).group(1))
    assert stated == pytest.approx(expected, rel=0.1)
    # many samples per class and D well below N: no warning
    pick = rng.choice(len(y), size=600, replace=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        selection.hscore(x[pick] / 16.0, y[pick])
        selection.hscore(rng.normal(size=(600, 600)), y[pick])
