"""``TorchKernelSVC`` (transferkit/sklearn/_svc.py): the same model as ``sklearn.svm.SVC``."""

from __future__ import annotations

import importlib.util
import math
import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import load_breast_cancer
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.utils.estimator_checks import parametrize_with_checks

import transferkit as tk
from tests.sklearn._reference import assert_same_svm
from transferkit import kernels
from transferkit.sklearn import TorchKernelSVC

ESTIMATORS = [
    TorchKernelSVC(device="cpu"),
    TorchKernelSVC(device="cpu", probability=True, random_state=0),
    TorchKernelSVC(device="cpu", solver="nystroem", n_components=20, random_state=0),
]

# scikit-learn marks the same checks as expected failures for sklearn.svm.SVC: libsvm's
# C-weighting by sample_weight is not equivalent to repeating rows (different dual
# problem and stopping point). LinearSVC (the Nystroem path) behaves the same way.
SVC_XFAIL = {
    "check_sample_weight_equivalence_on_dense_data": (
        "as sklearn.svm.SVC: sample_weight is not equivalent to removing/repeating samples"
    ),
}


@parametrize_with_checks(ESTIMATORS, expected_failed_checks=lambda estimator: SVC_XFAIL)
def test_passes_sklearn_estimator_checks(estimator, check):
    check(estimator)


@pytest.mark.parametrize("C", [1.0, 10.0])
def test_rbf_svm_agrees_with_sklearn_svc_on_digits(digits, C):
    x_train, y_train, x_test, y_test = digits
    ours = TorchKernelSVC(kernel="rbf", C=C, device="cpu", chunk_size=300).fit(x_train, y_train)
    theirs = SVC(kernel="rbf", C=C).fit(x_train, y_train)
    ours_pred, theirs_pred = ours.predict(x_test), theirs.predict(x_test)
    assert np.mean(ours_pred == theirs_pred) >= 0.995
    accuracy_gap = abs(np.mean(ours_pred == y_test) - np.mean(theirs_pred == y_test))
    assert accuracy_gap <= 0.002
    assert ours.gamma_ == pytest.approx(theirs._gamma, rel=1e-12)
    np.testing.assert_array_equal(ours.support_, theirs.support_)
    np.testing.assert_array_equal(ours.n_support_, theirs.n_support_)
    np.testing.assert_allclose(ours.support_vectors_, theirs.support_vectors_)
    np.testing.assert_allclose(
        ours.decision_function(x_test), theirs.decision_function(x_test), atol=5e-3
    )


@pytest.mark.parametrize("C", [1.0, 10.0])
@pytest.mark.parametrize("kernel", ["rbf", "poly", "linear"])
def test_predictions_are_identical_to_sklearn_svc_on_digits(digits, kernel, C):
    x_train, y_train, x_test, _ = digits
    ours = TorchKernelSVC(kernel=kernel, C=C, device="cpu", chunk_size=300)
    theirs = SVC(kernel=kernel, C=C)
    if kernel != "rbf":
        ours.set_params(gamma=1e-3)
        theirs.set_params(gamma=1e-3)
    assert_same_svm(ours.fit(x_train, y_train), theirs.fit(x_train, y_train), x_test)


def test_predictions_are_identical_to_sklearn_svc_on_breast_cancer():
    # A second real data set: binary, 30 standardised features, class weights.
    x, y = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x = StandardScaler().fit_transform(x[order])
    y = y[order]
    for params in ({"C": 1.0}, {"C": 10.0, "class_weight": "balanced"}):
        ours = TorchKernelSVC(device="cpu", chunk_size=64, **params).fit(x[:400], y[:400])
        theirs = SVC(**params).fit(x[:400], y[:400])
        assert_same_svm(ours, theirs, x[400:])


def test_sample_weights_and_string_labels_give_svc_identical_models(digits):
    # fit groups the rows by class before libsvm sees them; weights and labels must follow.
    x_train, y_train, x_test, _ = digits
    weight = np.random.default_rng(0).uniform(0.2, 2.0, size=len(y_train))
    names = np.array(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    )
    labels = names[y_train]
    ours = TorchKernelSVC(device="cpu").fit(x_train, labels, sample_weight=weight)
    theirs = SVC().fit(x_train, labels, sample_weight=weight)
    assert_same_svm(ours, theirs, x_test)
    np.testing.assert_array_equal(ours.classes_, theirs.classes_)
    np.testing.assert_array_equal(ours.support_vectors_, x_train[theirs.support_])


HAS_MNIST = importlib.util.find_spec("pureml") is not None
HAS_MNIST = HAS_MNIST and importlib.util.find_spec("zarr") is not None


@pytest.mark.skipif(not HAS_MNIST, reason="needs the packaged MNIST (transferkit[data])")
def test_predictions_are_identical_to_sklearn_svc_on_mnist_pixels():
    # 784 pixels with dozens of always-blank border columns (dropped from the distances).
    data = tk.datasets.mnist()
    x = data.train_images[:1500].reshape(1500, -1).numpy() / 255.0
    y = data.train_labels[:1500].numpy()
    x_test = data.test_images[:500].reshape(500, -1).numpy() / 255.0
    assert (x.min(0) == x.max(0)).sum() > 50
    ours = TorchKernelSVC(device="cpu", chunk_size=512).fit(x, y)
    assert_same_svm(ours, SVC().fit(x, y), x_test)


@pytest.mark.parametrize("shape", ["ovr", "ovo"])
def test_support_vector_cross_kernel_gives_libsvm_decision_values(digits, shape):
    # Reference: libsvm on a numpy Gram matrix, predicting from the full-width kernel.
    x_train, y_train, x_test, _ = digits
    x_train, y_train, x_test = x_train[:300], y_train[:300], x_test[:200]
    ours = TorchKernelSVC(
        kernel="poly",
        gamma=0.01,
        degree=2,
        coef0=1.0,
        decision_function_shape=shape,
        device="cpu",
    ).fit(x_train, y_train)
    reference = SVC(kernel="precomputed", decision_function_shape=shape)
    reference.fit((0.01 * x_train @ x_train.T + 1.0) ** 2, y_train)
    test_gram = (0.01 * x_test @ x_train.T + 1.0) ** 2
    np.testing.assert_allclose(
        ours.decision_function(x_test), reference.decision_function(test_gram), atol=1e-8
    )
    np.testing.assert_array_equal(ours.predict(x_test), reference.predict(test_gram))


def test_predict_proba_exists_only_with_probability_and_matches_svc(digits):
    x_train, y_train, x_test, _ = digits
    assert not hasattr(TorchKernelSVC().fit(x_train[:200], y_train[:200]), "predict_proba")
    ours = TorchKernelSVC(probability=True, random_state=0, device="cpu")
    ours.fit(x_train[:300], y_train[:300])
    with pytest.warns(FutureWarning):
        theirs = SVC(probability=True, random_state=0).fit(x_train[:300], y_train[:300])
    proba = ours.predict_proba(x_test)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    np.testing.assert_allclose(proba, theirs.predict_proba(x_test), atol=1e-3)


def test_kernel_object_equals_named_kernel(digits):
    x_train, y_train, x_test, _ = digits
    sigma = 4.0 * math.sqrt(x_train.shape[1])
    named = TorchKernelSVC(kernel="rbf", gamma=0.5 / sigma**2).fit(x_train, y_train)
    kernel = kernels.GaussianKernel(bandwidth=sigma, multipliers=(1.0,))
    custom = TorchKernelSVC(kernel=kernel).fit(x_train, y_train)
    np.testing.assert_array_equal(custom.predict(x_test), named.predict(x_test))
    assert clone(custom).kernel is not kernel


def test_kernel_without_fixed_bandwidth_is_rejected():
    x = np.random.default_rng(0).normal(size=(10, 2))
    with pytest.raises(ValueError, match="bandwidth"):
        TorchKernelSVC(kernel=kernels.GaussianKernel()).fit(x, [0, 1] * 5)


def test_unknown_options_raise_with_suggestions():
    x = np.random.default_rng(0).normal(size=(10, 2))
    y = [0, 1] * 5
    with pytest.raises(ValueError, match="did you mean 'rbf'"):
        TorchKernelSVC(kernel="rbg").fit(x, y)
    with pytest.raises(ValueError, match="solver"):
        TorchKernelSVC(solver="fast").fit(x, y)
    with pytest.raises(ValueError, match="C"):
        TorchKernelSVC(C=0.0).fit(x, y)
    with pytest.raises(ValueError, match="gamma"):
        TorchKernelSVC(gamma="scaled").fit(x, y)
    fitted = TorchKernelSVC().fit(x, y)
    with pytest.raises(ValueError, match="features"):
        fitted.predict(np.zeros((3, 5)))


def test_nystroem_path_is_chosen_above_the_exact_limit_and_stays_accurate(digits):
    x_train, y_train, x_test, y_test = digits
    exact = TorchKernelSVC().fit(x_train, y_train)
    approx = TorchKernelSVC(max_exact_samples=500, n_components=500, random_state=0)
    approx.fit(x_train, y_train)
    assert exact.solver_ == "exact" and approx.solver_ == "nystroem"
    assert approx.landmarks_.shape == (500, 64)
    assert not hasattr(approx, "support_vectors_")
    exact_accuracy = exact.score(x_test, y_test)
    assert approx.score(x_test, y_test) >= exact_accuracy - 0.03


def test_unlabelled_rows_are_ignored_by_fit_and_score(digits):
    x_train, y_train, x_test, y_test = digits
    extra = np.random.default_rng(0).normal(size=(50, 64)) * 5
    x = np.vstack([x_train[:300], extra])
    y = np.r_[y_train[:300], -np.ones(50, dtype=int)]
    with_rows = TorchKernelSVC(unlabelled=-1).fit(x, y)
    without = TorchKernelSVC().fit(x_train[:300], y_train[:300])
    np.testing.assert_array_equal(with_rows.predict(x_test), without.predict(x_test))
    assert -1 not in with_rows.classes_
    mixed_x = np.vstack([x_test, extra])
    mixed_y = np.r_[y_test, -np.ones(50, dtype=int)]
    assert with_rows.score(mixed_x, mixed_y) == pytest.approx(without.score(x_test, y_test))


def test_fitted_svm_pickles_and_predicts_the_same(digits):
    x_train, y_train, x_test, _ = digits
    model = TorchKernelSVC(kernel="laplacian").fit(x_train[:200], y_train[:200])
    restored = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(restored.predict(x_test), model.predict(x_test))


@pytest.mark.cuda
def test_cuda_gram_gives_the_cpu_predictions(digits):
    x_train, y_train, x_test, _ = digits
    cpu = TorchKernelSVC(device="cpu").fit(x_train, y_train).predict(x_test)
    gpu64 = TorchKernelSVC(device="cuda").fit(x_train, y_train).predict(x_test)
    gpu32 = TorchKernelSVC(device="cuda", dtype="float32").fit(x_train, y_train).predict(x_test)
    assert np.mean(gpu64 == cpu) >= 0.999
    assert np.mean(gpu32 == cpu) >= 0.995


@pytest.mark.parametrize("scale", [1e20, 1e-20])
@pytest.mark.parametrize("kernel", ["rbf", "linear", "laplacian"])
def test_float32_gram_refuses_magnitudes_it_cannot_resolve(kernel, scale):
    # float32 Gram matrices of 1e20 / 1e-20 features came back NaN (an sklearn error that
    # names nothing) or silently wrong (rbf at 1e20 scored chance); float64 handles them.
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 3)) * scale, np.arange(40) % 2
    with pytest.raises(ValueError, match="X: values up to .* use dtype='float64'"):
        TorchKernelSVC(kernel=kernel, dtype="float32", device="cpu").fit(x, y)
    wide = TorchKernelSVC(kernel=kernel, device="cpu").fit(x / scale, y).score(x / scale, y)
    if kernel != "linear":  # libsvm's linear dual diverges at 1e20 in any precision
        assert TorchKernelSVC(kernel=kernel, device="cpu").fit(x, y).score(x, y) == wide


@pytest.mark.parametrize("make", [TorchKernelSVC, tk.sklearn.PrototypeClassifier])
def test_score_with_unlabelled_rows_checks_dataframe_columns_like_predict(make):
    # score() with `unlabelled` turned X into a bare array before scoring, so a DataFrame
    # whose columns came in another order than in fit was scored on the wrong columns
    # (only a "no valid feature names" warning), while predict() refused it.
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(80, 3)) * [1, 10, 100], columns=["a", "b", "c"])
    y = (frame["a"] > 0).to_numpy().astype(int)
    y[:10] = -1
    weight = rng.uniform(0.5, 2.0, len(y))
    kwargs = {"device": "cpu"} if make is TorchKernelSVC else {}
    model = make(unlabelled=-1, **kwargs).fit(frame, y)
    keep = y != -1
    expected = float(np.average(model.predict(frame[keep]) == y[keep], weights=weight[keep]))
    assert model.score(frame, y, sample_weight=weight) == pytest.approx(expected)
    swapped = frame[["c", "b", "a"]]
    with pytest.raises(ValueError, match="feature names"):
        model.predict(swapped)
    with pytest.raises(ValueError, match="feature names"):
        model.score(swapped, y)
    with pytest.raises(ValueError, match="labels to match"):
        model.score(frame, y[:-1])
