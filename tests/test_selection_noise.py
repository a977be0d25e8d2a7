"""Transferability scores must not rank pure noise above informative features.

Informative candidates are real: the pixels of held-out digits and the class
probabilities of a classifier trained on the other half. Noise candidates are random
with as many or more dimensions (or source classes) than samples, and with fewer.
"""

from __future__ import annotations

import functools
import math
import re
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.covariance import LedoitWolf
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from transferkit import selection

SEEDS = (0, 1, 2)
N = 240  # target samples per seed


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, LogisticRegression]:
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    rng = np.random.default_rng(123)
    order = rng.permutation(len(y))
    source, rest = order[:700], order[700:]
    net = LogisticRegression(max_iter=2000).fit(x[source], y[source])
    return x[rest], y[rest], net


def _candidates(digits, seed: int, kind: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    x, y, net = digits
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(y), size=N, replace=False)
    labels = y[pick]
    if kind == "features":
        return {
            "noise, D >= N": rng.normal(size=(N, 2 * N)),
            "noise, D = N": rng.normal(size=(N, N)),
            "digits pixels": x[pick],
            "noise, D < N": rng.normal(size=(N, N // 4)),
        }, labels
    return {
        "noise, Z >= N": _softmax(3.0 * rng.normal(size=(N, 2 * N))),
        "trained classifier": net.predict_proba(x[pick]),
        "noise, Z < N": _softmax(3.0 * rng.normal(size=(N, N // 8))),
    }, labels


FEATURE_SCORES = [s for s in selection.SCORES if s not in ("leep", "nce")]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("score", FEATURE_SCORES)
def test_feature_scores_rank_digits_above_noise_of_any_dimension(digits, score, seed) -> None:
    candidates, labels = _candidates(digits, seed, "features")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default scores need no warning here
        table = selection.rank(candidates, labels, score=score)
    assert table.best == "digits pixels", str(table)


@pytest.mark.parametrize("seed", SEEDS)
def test_unregularised_hscore_ranks_high_dimensional_noise_first_and_warns(digits, seed) -> None:
    # the failure the Ledoit-Wolf shrinkage fixes: noise with D >= N - 1 reaches C - 1
    candidates, labels = _candidates(digits, seed, "features")
    with pytest.warns(UserWarning, match="shrinkage='ledoit_wolf'"):
        value = selection.hscore(candidates["noise, D >= N"], labels, shrinkage=None)
    assert value == pytest.approx(9.0, abs=1e-6)
    assert value > selection.hscore(candidates["digits pixels"], labels, shrinkage=None)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("score", ["leep", "nce"])
def test_probability_scores_rank_a_trained_classifier_above_noise(digits, score, seed) -> None:
    candidates, labels = _candidates(digits, seed, "probs")
    robust = functools.partial(getattr(selection, score), estimator="leave_one_out")
    table = selection.rank(candidates, labels, score=robust)
    assert table.names[0] == "trained classifier", str(table)
    assert table.score == score
    # no information in noise: the held-out score is near log of the label frequencies
    prior = np.bincount(labels) / len(labels)
    baseline = float(np.mean(np.log(prior[labels])))
    assert table["noise, Z >= N"].score < baseline + 0.15
    # the paper's in-sample formula ranks the classifier first too when the source
    # classes are fewer than the samples, and warns when they are not
    few = {k: v for k, v in candidates.items() if k != "noise, Z >= N"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert selection.rank(few, labels, score=score).best == "trained classifier"
    with pytest.warns(UserWarning, match="estimator='leave_one_out'"):
        getattr(selection, score)(candidates["noise, Z >= N"], labels, estimator="empirical")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("score", ["leep", "nce"])
def test_default_probability_scores_rank_noise_below_a_trained_classifier(
    digits, score, seed
) -> None:
    # the default estimator ("auto") switches to leave-one-out where the paper's formula
    # would overfit, so rank() with the plain score name never puts noise first
    candidates, labels = _candidates(digits, seed, "probs")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = selection.rank(candidates, labels, score=score)
    assert table.best == "trained classifier", str(table)
    assert table.names[-1].startswith("noise"), str(table)
    # where every source class has enough samples, "auto" is the paper's formula
    few = candidates["trained classifier"]
    assert getattr(selection, score)(few, labels) == getattr(selection, score)(
        few, labels, estimator="empirical"
    )


def test_in_sample_leep_and_nce_reward_many_random_source_classes() -> None:
    # why leave-one-out exists: 1000 random source classes, 200 target samples
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=200)
    noise = _softmax(30.0 * rng.normal(size=(200, 1000)))
    with pytest.warns(UserWarning, match="leep: 200 target samples"):
        assert selection.leep(noise, labels, estimator="empirical") > -0.5  # nearly perfect
    with pytest.warns(UserWarning, match="nce: 200 target samples"):
        assert selection.nce(noise, labels, estimator="empirical") > -0.5
    # the default ("auto") holds the estimate out here
    assert selection.leep(noise, labels) < -2.0
    assert selection.nce(noise, labels) < -2.0
    # held out, the same noise carries no information (about -log 10 = -2.3)
    assert selection.leep(noise, labels, estimator="leave_one_out") < -2.0
    assert selection.nce(noise, labels, estimator="leave_one_out") < -2.0


# --------------------------------------------------------------------------- references


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


def reference_leave_one_out_leep(p: np.ndarray, y: np.ndarray) -> float:
    n, z_classes = p.shape
    classes = sorted(set(y.tolist()))
    total = 0.0
    for i in range(n):
        rest = [j for j in range(n) if j != i]
        prior = (sum(y[j] == y[i] for j in rest) + 1) / (n - 1 + len(classes))
        eep = 0.0
        for z in range(z_classes):
            joint = sum(p[j, z] for j in rest if y[j] == y[i])
            marginal = sum(p[j, z] for j in rest)
            eep += p[i, z] * (joint + prior) / (marginal + 1.0)
        total += math.log(eep)
    return total / n


def reference_leave_one_out_nce(z: np.ndarray, y: np.ndarray) -> float:
    n = len(y)
    classes = sorted(set(y.tolist()))
    total = 0.0
    for i in range(n):
        rest = [j for j in range(n) if j != i]
        prior = (sum(y[j] == y[i] for j in rest) + 1) / (n - 1 + len(classes))
        same_source = [j for j in rest if z[j] == z[i]]
        hits = sum(y[j] == y[i] for j in same_source)
        total += math.log((hits + prior) / (len(same_source) + 1))
    return total / n


@given(
    p=arrays(np.float64, (9, 4), elements=st.floats(0.01, 1.0)),
    y=arrays(np.int64, (9,), elements=st.integers(0, 2)),
)
def test_leave_one_out_leep_equals_loop_reference(p: np.ndarray, y: np.ndarray) -> None:
    p = p / p.sum(1, keepdims=True)
    value = selection.leep(p, y, estimator="leave_one_out")
    assert value == pytest.approx(reference_leave_one_out_leep(p, y), rel=1e-9)
    assert value <= 0.0


@given(
    z=arrays(np.int64, (15,), elements=st.integers(0, 6)),
    y=arrays(np.int64, (15,), elements=st.integers(0, 3)),
)
def test_leave_one_out_nce_equals_loop_reference(z: np.ndarray, y: np.ndarray) -> None:
    value = selection.nce(z, y, estimator="leave_one_out")
    assert value == pytest.approx(reference_leave_one_out_nce(z, y), abs=1e-12)
    assert value <= 0.0


# --------------------------------------------------------------------------- invariants


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


@given(seed=st.integers(0, 10_000))
def test_leave_one_out_scores_ignore_sample_order_and_class_names(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, z = 30, int(rng.integers(2, 40))
    y = rng.integers(0, 3, size=n)
    p = _softmax(rng.normal(size=(n, z)))
    order, columns = rng.permutation(n), rng.permutation(z)
    renamed = np.array([7, 2, 11])[y]
    value = selection.leep(p, y, estimator="leave_one_out")
    moved = selection.leep(p[order][:, columns], renamed[order], estimator="leave_one_out")
    assert moved == pytest.approx(value, rel=1e-9)
    hard = p.argmax(1)
    value = selection.nce(hard, y, estimator="leave_one_out")
    assert selection.nce(hard[order] * 3 + 1, renamed[order], estimator="leave_one_out") == (
        pytest.approx(value, rel=1e-9)
    )


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
