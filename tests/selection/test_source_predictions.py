"""LEEP and NCE: references, in-sample vs leave-one-out estimators, noise."""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tests.selection._data import SEEDS, load_benchmark, noise_candidates, softmax
from transferkit import selection


def reference_leep(p: np.ndarray, y: np.ndarray) -> float:
    n, z_classes = p.shape
    classes = sorted(set(y.tolist()))
    joint = np.zeros((len(classes), z_classes))
    for i in range(n):
        for z in range(z_classes):
            joint[classes.index(y[i]), z] += p[i, z] / n
    total = 0.0
    for i in range(n):
        eep = 0.0
        for z in range(z_classes):
            eep += joint[classes.index(y[i]), z] / joint[:, z].sum() * p[i, z]
        total += math.log(eep)
    return total / n


def reference_nce(z: np.ndarray, y: np.ndarray) -> float:
    n = len(y)
    result = 0.0
    for zz in set(z.tolist()):
        pz = np.mean(z == zz)
        for yy in set(y.tolist()):
            pyz = np.sum((z == zz) & (y == yy)) / n
            if pyz > 0:
                result += pyz * math.log(pyz / pz)
    return result


@pytest.mark.filterwarnings("ignore:leep.*in-sample estimate")
@given(
    p=arrays(np.float64, (12, 4), elements=st.floats(0.01, 1.0)),
    y=arrays(np.int64, (12,), elements=st.integers(0, 2)),
)
def test_leep_equals_loop_reference(p: np.ndarray, y: np.ndarray) -> None:
    p = p / p.sum(1, keepdims=True)
    assert selection.leep(p, y, estimator="empirical") == pytest.approx(
        reference_leep(p, y), rel=1e-9
    )


@pytest.mark.filterwarnings("ignore:leep.*in-sample estimate")
def test_leep_is_at_most_zero_and_zero_for_deterministic_source_labels() -> None:
    y = np.array([0, 1, 1, 0, 2])
    p = np.eye(3)[[2, 0, 0, 2, 1]]
    assert selection.leep(p, y, estimator="empirical") == pytest.approx(0.0, abs=1e-12)
    rng = np.random.default_rng(0)
    q = rng.dirichlet(np.ones(3), size=5)
    assert selection.leep(q, y) <= 0.0


@pytest.mark.filterwarnings("ignore:nce.*in-sample estimate")
@given(
    z=arrays(np.int64, (20,), elements=st.integers(0, 4)),
    y=arrays(np.int64, (20,), elements=st.integers(0, 3)),
)
def test_nce_equals_count_reference_and_accepts_scores(z: np.ndarray, y: np.ndarray) -> None:
    expected = reference_nce(z, y)
    assert selection.nce(z, y, estimator="empirical") == pytest.approx(expected, abs=1e-12)
    scores = np.eye(5)[z] + 0.01 * np.arange(5)
    assert selection.nce(
        torch.from_numpy(scores), torch.from_numpy(y), estimator="empirical"
    ) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("score", ["leep", "nce"])
def test_probability_scores_rank_a_trained_classifier_above_noise(digits, score, seed) -> None:
    candidates, labels = noise_candidates(digits, seed, "probs")
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
    candidates, labels = noise_candidates(digits, seed, "probs")
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
    noise = softmax(30.0 * rng.normal(size=(200, 1000)))
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


@given(seed=st.integers(0, 10_000))
def test_leave_one_out_scores_ignore_sample_order_and_class_names(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, z = 30, int(rng.integers(2, 40))
    y = rng.integers(0, 3, size=n)
    p = softmax(rng.normal(size=(n, z)))
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


# --------------------------------------------------------------------------- validation cost
# Probabilities above 2 MiB are checked block by block, in the pass that computes the
# joint distribution (tests/selection/test_speed.py and benchmarks/bench_selection.py
# time it). The cases below run a small matrix (one check over the whole matrix) and a
# large one (the block-by-block check), so both paths keep every check.
SIZES = {"small": (200, 10), "large": (3000, 100)}  # 16 kB and 2.4 MB of float64


def _source_probs(size: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    n, z = SIZES[size]
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, size=n)
    logits = 2.0 * rng.normal(size=(5, z))[y] + rng.normal(size=(n, z))
    return softmax(logits), y


def reference_leave_one_out_leep_vectorised(p: np.ndarray, y: np.ndarray) -> float:
    """The leave-one-out formula of the docstring, one sample at a time (NumPy rows)."""
    classes, index = np.unique(y, return_inverse=True)
    counts = np.bincount(index)
    n = len(y)
    total = 0.0
    for i in range(n):
        same = index == index[i]
        same[i] = False
        rest = np.ones(n, dtype=bool)
        rest[i] = False
        prior = counts[index[i]] / (n - 1 + len(classes))  # (count - 1 + 1) / (N - 1 + C)
        conditional = (p[same].sum(0) + prior) / (p[rest].sum(0) + 1.0)
        total += math.log(float(p[i] @ conditional))
    return total / n


@pytest.mark.parametrize("size", list(SIZES))
def test_leep_of_small_and_large_probabilities_equals_the_references(size: str) -> None:
    p, y = _source_probs(size)
    bench = load_benchmark()
    assert selection.leep(p, y, estimator="empirical") == pytest.approx(
        bench.leep_numpy(p, y), rel=1e-12
    )
    assert selection.leep(p, y, estimator="leave_one_out") == pytest.approx(
        reference_leave_one_out_leep_vectorised(p, y), rel=1e-12
    )


@pytest.mark.parametrize("estimator", ["empirical", "leave_one_out"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("size", list(SIZES))
def test_leep_rejects_one_tiny_negative_probability_anywhere(
    size: str, where: str, estimator: str
) -> None:
    # -1e-12 leaves the row sums at 1: only the sign check can see it
    p, y = _source_probs(size)
    row = {"first": 0, "middle": len(y) // 2 + 3, "last": len(y) - 1}[where]
    bad = p.copy()
    bad[row, -1] = -1e-12
    with pytest.raises(ValueError, match=r"source_probs: expected probabilities >= 0"):
        selection.leep(bad, y, estimator=estimator)


@pytest.mark.parametrize("size", list(SIZES))
def test_leep_reports_nan_before_negative_values_and_negative_values_before_bad_labels(
    size: str,
) -> None:
    p, y = _source_probs(size)
    both = p.copy()
    both[1, 0], both[-2, 1] = np.nan, -0.5
    with pytest.raises(ValueError, match="source_probs: expected finite values"):
        selection.leep(both, y)
    negative = p.copy()
    negative[-2, 1] = -0.5
    with pytest.raises(ValueError, match="source_probs: expected probabilities >= 0"):
        selection.leep(negative, y[:-1])  # wrong number of labels too
    with pytest.raises(ValueError, match="source_probs: expected probabilities >= 0"):
        selection.leep(negative, y, estimator="in_sample")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="labels: expected class indices in >= 0"):
        selection.leep(p, np.where(np.arange(len(y)) == 3, -1, y))
    with pytest.raises(ValueError, match=f"labels: expected {len(y)} labels"):
        selection.leep(p, y[:-1])


@pytest.mark.filterwarnings("ignore:(leep|nce).*in-sample estimate")
@given(seed=st.integers(0, 10_000))
def test_empirical_scores_ignore_sample_order_class_names_and_input_precision(seed: int) -> None:
    """Guard: the paper's in-sample LEEP and NCE (and "auto") are invariant to the order
    of the samples and the source columns, to gaps and names of the labels, and give the
    float64 value for float32 tensors (up to float32 rounding of the inputs)."""
    rng = np.random.default_rng(seed)
    n, z = 40, int(rng.integers(2, 12))
    y = rng.integers(0, 3, size=n)
    p = softmax(rng.normal(size=(n, z)) * 2)
    order, columns = rng.permutation(n), rng.permutation(z)
    renamed = np.array([9, 0, 4])[y]
    for estimator in ("empirical", "auto"):
        value = selection.leep(p, y, estimator=estimator)  # type: ignore[arg-type]
        moved = selection.leep(p[order][:, columns], renamed[order], estimator=estimator)  # type: ignore[arg-type]
        assert moved == pytest.approx(value, rel=1e-9)
        single = selection.leep(
            torch.from_numpy(p).float(), torch.from_numpy(y), estimator=estimator
        )  # type: ignore[arg-type]
        assert single == pytest.approx(value, rel=1e-5)
        hard = p.argmax(1)
        value = selection.nce(hard, y, estimator=estimator)  # type: ignore[arg-type]
        assert selection.nce(hard[order] * 5 + 2, renamed[order], estimator=estimator) == (  # type: ignore[arg-type]
            pytest.approx(value, rel=1e-9, abs=1e-12)
        )
        assert selection.nce(torch.from_numpy(p), torch.from_numpy(y), estimator=estimator) == (  # type: ignore[arg-type]
            pytest.approx(value, rel=1e-9, abs=1e-12)
        )
