"""Tests of transferkit.sklearn: estimator contract, agreement with sklearn, alignment maths."""

from __future__ import annotations

import importlib.util
import math
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from sklearn.base import clone
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.decomposition import PCA
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.utils.estimator_checks import parametrize_with_checks

import transferkit as tk
from transferkit import kernels
from transferkit.sklearn import (
    CORAL,
    TCA,
    DeepFeatures,
    PrototypeClassifier,
    SubspaceAlignment,
    TorchKernelSVC,
    _gram,
    _kernel_gram,
    _make_kernel,
    _mirror_rows,
    _svc_kernel,
    make_deep_svm_pipeline,
)

CPU = torch.device("cpu")

# ----------------------------------------------------------------------------- contract

ESTIMATORS = [
    TorchKernelSVC(device="cpu"),
    TorchKernelSVC(device="cpu", probability=True, random_state=0),
    TorchKernelSVC(device="cpu", solver="nystroem", n_components=20, random_state=0),
    PrototypeClassifier(),
    PrototypeClassifier(metric="euclidean"),
    # The aligners need rows of both domains; the generic checks label rows 0, 1, ...,
    # so rows labelled 0 play the target domain.
    CORAL(unlabelled=0),
    TCA(n_components=2, unlabelled=0),
    SubspaceAlignment(n_components=1, unlabelled=0),
]

# scikit-learn marks the same checks as expected failures for sklearn.svm.SVC: libsvm's
# C-weighting by sample_weight is not equivalent to repeating rows (different dual
# problem and stopping point). LinearSVC (the Nystroem path) behaves the same way.
SVC_XFAIL = {
    "check_sample_weight_equivalence_on_dense_data": (
        "as sklearn.svm.SVC: sample_weight is not equivalent to removing/repeating samples"
    ),
}


# The aligners refuse a fit without rows of both domains (it would silently be a one-domain
# map); these checks draw labels in which no row carries the target label.
ONE_DOMAIN = "the check's labels hold no target row (label 0 here), which the aligners reject"
ALIGNER_XFAIL = {
    "check_estimators_dtypes": ONE_DOMAIN,
    "check_fit2d_1feature": ONE_DOMAIN,
}
# fit_transform maps source rows to the target domain, transform (prediction time) takes
# every row as target data, so the two differ by design once both domains are present.
SOURCE_MAP = "fit_transform maps the source rows, transform treats rows as target rows"
TRANSFORM_XFAIL = {
    "check_transformer_general": SOURCE_MAP,
    "check_transformer_general(readonly_memmap=True)": SOURCE_MAP,
    "check_transformer_data_not_an_array": SOURCE_MAP,
}


def expected_failed_checks(estimator: object) -> dict[str, str]:
    if isinstance(estimator, TorchKernelSVC):
        return SVC_XFAIL
    if isinstance(estimator, (CORAL, SubspaceAlignment)):
        return {**ALIGNER_XFAIL, **TRANSFORM_XFAIL}
    if isinstance(estimator, TCA):
        return ALIGNER_XFAIL
    return {}


@parametrize_with_checks(ESTIMATORS, expected_failed_checks=expected_failed_checks)
def test_passes_sklearn_estimator_checks(estimator, check):
    check(estimator)


# ----------------------------------------------------------------------------- kernels

KERNEL_CASES = ["rbf", "linear", "poly", "laplacian", "multi_rbf"]
MULTIPLIERS = (0.5, 1.0, 2.0)


def numpy_kernel(name: str, x: np.ndarray, y: np.ndarray, gamma: float) -> np.ndarray:
    """Independent reference: explicit broadcasting, no GEMM."""
    diff = x[:, None, :] - y[None, :, :]
    squared = (diff**2).sum(-1)
    inner = (x[:, None, :] * y[None, :, :]).sum(-1)
    if name == "rbf":
        return np.exp(-gamma * squared)
    if name == "multi_rbf":
        return sum(np.exp(-gamma * squared / m) for m in MULTIPLIERS)
    if name == "laplacian":
        return np.exp(-gamma * np.sqrt(squared))
    if name == "linear":
        return inner
    return (gamma * inner + 0.5) ** 3


@pytest.mark.parametrize("name", KERNEL_CASES)
def test_gram_matches_numpy_reference_for_every_kernel(name):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(37, 5)) + 3.0, rng.normal(size=(23, 5)) + 3.0
    kernel = _make_kernel(name, 0.2, 3, 0.5, MULTIPLIERS)
    cross = _gram(kernel, x, y, device=CPU, dtype=torch.float64, chunk_size=8)
    square = _gram(kernel, x, None, device=CPU, dtype=torch.float64, chunk_size=8)
    np.testing.assert_allclose(cross, numpy_kernel(name, x, y, 0.2), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(square, numpy_kernel(name, x, x, 0.2), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(square, square.T, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("rbf", lambda g: kernels.GaussianKernel(math.sqrt(0.5 / g), multipliers=(1.0,))),
        ("multi_rbf", lambda g: kernels.GaussianKernel(math.sqrt(0.5 / g), MULTIPLIERS)),
        ("laplacian", lambda g: kernels.LaplacianKernel(bandwidth=1.0 / g)),
        ("poly", lambda g: kernels.PolynomialKernel(degree=3, gamma=g, coef0=0.5)),
        ("linear", lambda g: kernels.LinearKernel()),
    ],
)
def test_named_kernels_are_the_transferkit_kernels(name, reference):
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 4)), rng.normal(size=(20, 4))
    ours = _gram(
        _make_kernel(name, 0.3, 3, 0.5, MULTIPLIERS),
        x,
        y,
        device=CPU,
        dtype=torch.float64,
        chunk_size=7,
    )
    theirs = reference(0.3)(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)


@given(
    n=st.integers(2, 40),
    m=st.integers(1, 30),
    chunk=st.integers(1, 50),
    name=st.sampled_from(KERNEL_CASES),
)
def test_chunked_gram_does_not_depend_on_chunk_size(n, m, chunk, name):
    rng = np.random.default_rng(n * 100 + m)
    x, y = rng.normal(size=(n, 3)), rng.normal(size=(m, 3))
    kernel = _make_kernel(name, 0.5, 2, 1.0, MULTIPLIERS)
    whole = _gram(kernel, x, y, device=CPU, dtype=torch.float64, chunk_size=10_000)
    pieces = _gram(kernel, x, y, device=CPU, dtype=torch.float64, chunk_size=chunk)
    np.testing.assert_allclose(pieces, whole, rtol=1e-12, atol=1e-12)
    square = _gram(kernel, x, None, device=CPU, dtype=torch.float64, chunk_size=chunk)
    full = _gram(kernel, x, x.copy(), device=CPU, dtype=torch.float64, chunk_size=10_000)
    # The symmetric path has exact zero self-distances; the cross path rounding noise,
    # which the Laplacian kernel's square root amplifies to ~1e-8.
    tolerance = 1e-7 if name == "laplacian" else 1e-12
    np.testing.assert_allclose(square, full, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("name", KERNEL_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_svc_gram_from_transferkit_kernels_matches_numpy_reference(name, dtype):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(37, 6)) + 3.0, rng.normal(size=(23, 6)) + 3.0
    x[:, 2] = y[:, 2] = 1.5  # a constant column (dropped for distances, kept for products)
    x[:, 4] = y[:, 4] = 0.0  # an all-zero column (dropped for every kernel)
    kernel = _svc_kernel(name, 0.2, 3, 0.5, MULTIPLIERS)
    assert isinstance(kernel, kernels.Kernel)
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5
    for chunk in (1, 8, 100):
        cross = _kernel_gram(kernel, x, y, device=CPU, dtype=dtype, chunk_size=chunk)
        square = _kernel_gram(kernel, x, None, device=CPU, dtype=dtype, chunk_size=chunk)
        assert cross.dtype == square.dtype == np.float64
        scale = np.abs(numpy_kernel(name, x, y, 0.2)).max()
        np.testing.assert_allclose(
            cross, numpy_kernel(name, x, y, 0.2), rtol=tolerance, atol=tolerance * scale
        )
        np.testing.assert_allclose(
            square, numpy_kernel(name, x, x, 0.2), rtol=tolerance, atol=tolerance * scale
        )
        np.testing.assert_array_equal(square, square.T)  # mirrored, exactly symmetric


@given(
    n=st.integers(1, 40),
    m=st.integers(1, 30),
    chunk=st.integers(1, 50),
    name=st.sampled_from(KERNEL_CASES),
)
def test_svc_gram_equals_the_old_gemm_kernels_at_any_chunk_size(n, m, chunk, name):
    # The SVC's Gram moved from the private GEMM kernels to transferkit.kernels: same values.
    rng = np.random.default_rng(n * 100 + m)
    x, y = rng.normal(size=(n, 3)), rng.normal(size=(m, 3))
    old = _make_kernel(name, 0.5, 2, 1.0, MULTIPLIERS)
    new = _svc_kernel(name, 0.5, 2, 1.0, MULTIPLIERS)
    for other in (y, None):
        before = _gram(old, x, other, device=CPU, dtype=torch.float64, chunk_size=10_000)
        after = _kernel_gram(new, x, other, device=CPU, dtype=torch.float64, chunk_size=chunk)
        np.testing.assert_allclose(after, before, rtol=1e-12, atol=1e-12)


@given(n=st.integers(1, 30), chunk=st.integers(1, 31), band=st.integers(1, 9))
def test_mirroring_row_strips_gives_the_symmetric_matrix_of_the_upper_triangle(n, chunk, band):
    upper = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    gram = upper.clone()
    for start in range(0, n, chunk):
        _mirror_rows(gram, slice(start, min(start + chunk, n)), band)
    expected = torch.triu(upper) + torch.triu(upper, 1).T
    torch.testing.assert_close(gram, expected, rtol=0, atol=0)


def test_svc_gram_does_not_modify_its_inputs():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 4)), rng.normal(size=(9, 4))
    x[:, 1] = 2.0
    x_copy, y_copy = x.copy(), y.copy()
    for name in KERNEL_CASES:
        kernel = _svc_kernel(name, 0.5, 2, 1.0, MULTIPLIERS)
        _kernel_gram(kernel, x, None, device=CPU, dtype=torch.float64, chunk_size=3)
        _kernel_gram(kernel, x, y, device=CPU, dtype=torch.float64, chunk_size=3)
    np.testing.assert_array_equal(x, x_copy)
    np.testing.assert_array_equal(y, y_copy)


# ----------------------------------------------------------------------------- kernel SVM


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    return x[order[:1000]], y[order[:1000]], x[order[1000:]], y[order[1000:]]


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


def assert_same_svm(ours, theirs, x_test):
    """Identical predictions and support, decision values equal to rounding."""
    np.testing.assert_array_equal(ours.predict(x_test), theirs.predict(x_test))
    np.testing.assert_array_equal(ours.support_, theirs.support_)
    np.testing.assert_array_equal(ours.n_support_, theirs.n_support_)
    np.testing.assert_allclose(ours.dual_coef_, theirs.dual_coef_, rtol=0, atol=1e-9)
    np.testing.assert_allclose(
        ours.decision_function(x_test), theirs.decision_function(x_test), rtol=0, atol=1e-9
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


def test_input_data_is_not_modified(digits):
    x_train, y_train, _, _ = digits
    x, y = x_train[:100].copy(), y_train[:100].copy()
    for estimator in (TorchKernelSVC(), PrototypeClassifier()):
        estimator.fit(x, y).predict(x)
    for transformer in (CORAL(), TCA(n_components=3), SubspaceAlignment(n_components=3)):
        transformer.fit_transform(x, np.r_[y[:50], -np.ones(50, dtype=int)])
    np.testing.assert_array_equal(x, x_train[:100])
    np.testing.assert_array_equal(y, y_train[:100])


@pytest.mark.cuda
def test_cuda_gram_gives_the_cpu_predictions(digits):
    x_train, y_train, x_test, _ = digits
    cpu = TorchKernelSVC(device="cpu").fit(x_train, y_train).predict(x_test)
    gpu64 = TorchKernelSVC(device="cuda").fit(x_train, y_train).predict(x_test)
    gpu32 = TorchKernelSVC(device="cuda", dtype="float32").fit(x_train, y_train).predict(x_test)
    assert np.mean(gpu64 == cpu) >= 0.999
    assert np.mean(gpu32 == cpu) >= 0.995


# ----------------------------------------------------------------------------- prototypes


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


# ----------------------------------------------------------------------------- alignment


def two_domains(n_source=150, n_target=120, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    source = rng.normal(size=(n_source, dim)) @ rng.normal(size=(dim, dim))
    target = 2.0 * rng.normal(size=(n_target, dim)) @ rng.normal(size=(dim, dim)) + 3.0
    x = np.vstack([source, target])
    y = np.r_[rng.integers(0, 2, n_source), -np.ones(n_target, dtype=int)]
    return x, y, source, target


def test_coral_gives_source_rows_the_target_mean_and_covariance():
    x, y, source, target = two_domains()
    out = CORAL(reg=0.0).fit_transform(x, y)
    aligned = out[: len(source)]
    np.testing.assert_allclose(aligned.mean(0), target.mean(0), atol=1e-9)
    np.testing.assert_allclose(np.cov(aligned.T), np.cov(target.T), rtol=1e-7, atol=1e-8)
    np.testing.assert_array_equal(out[len(source) :], target)


def test_coral_transform_is_the_identity_on_target_data():
    x, y, _, target = two_domains()
    coral = CORAL().fit(x, y)
    np.testing.assert_array_equal(coral.transform(target), target)


@pytest.mark.parametrize(
    "aligner",
    [CORAL(), TCA(n_components=2), SubspaceAlignment(n_components=2)],
    ids=lambda e: type(e).__name__,
)
def test_aligners_refuse_to_fit_without_both_domains(aligner):
    # Fitted on one domain only, CORAL would be the identity and TCA/SubspaceAlignment
    # plain (kernel) PCA: a silent no-op alignment instead of an error.
    x, y, _, _ = two_domains()
    with pytest.raises(ValueError, match=r"y: .* at least \d target rows"):
        aligner.fit(x, np.abs(y))
    with pytest.raises(ValueError, match=r"y: .* at least \d source rows"):
        aligner.fit(x, -np.ones_like(y))
    with pytest.raises(ValueError, match="y: .*requires y"):
        aligner.fit(x)


@pytest.mark.parametrize(
    "estimator",
    [
        TorchKernelSVC(device="cpu"),
        PrototypeClassifier(),
        CORAL(),
        TCA(n_components=2),
        SubspaceAlignment(n_components=2),
    ],
    ids=lambda e: type(e).__name__,
)
@pytest.mark.parametrize("kind", ["requires_grad", "bfloat16", "float16"])
def test_estimators_take_grad_and_half_precision_tensors(estimator, kind):
    x, y, _, _ = two_domains()
    rows = torch.from_numpy(x).float()
    given = {
        "requires_grad": rows.clone().requires_grad_(True),
        "bfloat16": rows.bfloat16(),
        "float16": rows.half(),
    }[kind]
    expected_rows = given.detach().float().numpy().astype(np.float64)
    labels = torch.from_numpy(y)
    fitted = estimator.fit(given, labels)
    reference = clone(estimator).fit(expected_rows, y)
    method = "predict" if hasattr(estimator, "predict") else "transform"
    np.testing.assert_allclose(
        getattr(fitted, method)(given), getattr(reference, method)(expected_rows), atol=1e-9
    )


def test_subspace_alignment_matches_pca_reference():
    x, y, source, target = two_domains(dim=6)
    out = SubspaceAlignment(n_components=3).fit_transform(x, y)
    ps = PCA(3).fit(source).components_.T
    pt = PCA(3).fit(target).components_.T
    # Sign-invariant comparison: multiply back by the (sign-ambiguous) target basis.
    expected_source = (source - source.mean(0)) @ ps @ ps.T @ pt @ pt.T
    expected_target = (target - target.mean(0)) @ pt @ pt.T
    sa = SubspaceAlignment(n_components=3).fit(x, y)
    basis = sa.target_components_
    np.testing.assert_allclose(out[: len(source)] @ basis.T, expected_source, atol=1e-8)
    np.testing.assert_allclose(out[len(source) :] @ basis.T, expected_target, atol=1e-8)
    np.testing.assert_allclose(sa.transform(target), out[len(source) :], atol=1e-10)


def tca_reference(x, source_count, k, mu, gamma):
    """Pan et al. (2011), written literally: eig of (K L K + mu I)^-1 K H K."""
    n = len(x)
    squared = ((x[:, None] - x[None]) ** 2).sum(-1)
    kernel = np.exp(-gamma * squared)
    e = np.r_[
        np.full(source_count, 1 / source_count), np.full(n - source_count, -1 / (n - source_count))
    ]
    mmd = np.outer(e, e)
    centre = np.eye(n) - np.ones((n, n)) / n
    matrix = np.linalg.solve(kernel @ mmd @ kernel + mu * np.eye(n), kernel @ centre @ kernel)
    values, vectors = np.linalg.eig(matrix)
    order = np.argsort(-values.real)[:k]
    return kernel @ vectors[:, order].real


def test_tca_spans_the_reference_transfer_components():
    x, y, source, _ = two_domains(n_source=40, n_target=30, dim=3)
    tca = TCA(n_components=2, mu=0.5, gamma=0.1).fit(x, y)
    ours = tca.transform(x)
    reference = tca_reference(x, len(source), 2, 0.5, 0.1)
    for j in range(2):
        cosine = abs(ours[:, j] @ reference[:, j]) / (
            np.linalg.norm(ours[:, j]) * np.linalg.norm(reference[:, j])
        )
        assert cosine == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(tca.fit_transform(x, y), ours, atol=1e-9)


def test_tca_with_small_mu_brings_the_domain_means_closer():
    x, y, _, _ = two_domains(n_source=60, n_target=60)

    def mean_gap(mu):
        out = TCA(n_components=3, mu=mu).fit_transform(x, y)
        gap = out[y != -1].mean(0) - out[y == -1].mean(0)
        return np.linalg.norm(gap) / np.linalg.norm(out.std(0))

    assert mean_gap(1e-3) < 0.5 * mean_gap(1e3)


def test_aligners_reject_too_many_components_and_too_few_rows():
    x, y, _, _ = two_domains(dim=3)
    with pytest.raises(ValueError, match="n_components"):
        SubspaceAlignment(n_components=4).fit(x, y)
    with pytest.raises(ValueError, match="n_components"):
        TCA(n_components=1000).fit(x, y)
    with pytest.raises(ValueError, match="2 target rows"):
        CORAL().fit(x[:151], np.r_[y[:150], -1])


# ----------------------------------------------------------------------------- pipelines


class Flatten(torch.nn.Module):
    def forward(self, x):
        return x.flatten(1)


def small_net():
    torch.manual_seed(0)
    return tk.models.SmallCNN(num_classes=10, width=4, feature_dim=16)


def test_deep_features_returns_the_model_features_and_clones():
    net = small_net()
    images = tk.datasets.digits(None, seed=0).source_x[:20]
    flat = images.flatten(1).numpy()
    features = DeepFeatures(net, layers="neck", input_shape=(1, 16, 16)).fit_transform(flat)
    with torch.no_grad():
        expected = net.eval().forward_features(images).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)
    copy = clone(DeepFeatures(net, layers="neck", input_shape=(1, 16, 16)))
    assert copy.model is not net
    np.testing.assert_allclose(copy.transform(flat), features, rtol=1e-5, atol=1e-6)


def test_deep_features_concatenates_layers_and_applies_the_input_transform():
    net = small_net()
    images = tk.datasets.digits(None, seed=0).source_x[:8]
    both = DeepFeatures(net, layers=["neck", "fc"]).fit_transform(images)
    assert both.shape == (8, 16 + 10)
    flipped = DeepFeatures(net, layers="fc", input_transform=lambda t: t.flip(-1))
    with torch.no_grad():
        expected = net.eval()(images.flip(-1)).numpy()
    np.testing.assert_allclose(flipped.fit_transform(images), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="input_shape"):
        DeepFeatures(net, input_shape=(1, 8, 8)).fit_transform(images.flatten(1))


def test_deep_svm_pipeline_works_in_grid_search():
    task = tk.datasets.digits(None, seed=0)
    x = task.source_x[:200].flatten(1).numpy()
    y = task.source_y[:200].numpy()
    pipe = make_deep_svm_pipeline(
        small_net(), layers="neck", feature_params={"input_shape": (1, 16, 16)}
    )
    search = GridSearchCV(pipe, {"svc__C": [1.0, 10.0]}, cv=2).fit(x, y)
    assert search.best_params_["svc__C"] in (1.0, 10.0)
    assert search.predict(x[:5]).shape == (5,)


@pytest.mark.parametrize("align", ["coral", "tca", "subspace"])
def test_aligned_pipeline_fits_on_source_plus_unlabelled_target(align):
    task = tk.datasets.digits("noise", seed=0).flat()
    x = np.vstack([task.source_x[:300].numpy(), task.target_x[:200].numpy()])
    y = np.r_[task.source_y[:300].numpy(), -np.ones(200, dtype=int)]
    params = {"input_shape": (1, 16, 16)}
    pipe = make_deep_svm_pipeline(small_net(), layers="neck", align=align, feature_params=params)
    if align == "subspace":
        pipe.set_params(align__n_components=8)
    pipe.fit(x, y)
    assert pipe.named_steps["svc"].unlabelled == -1
    assert -1 not in pipe.classes_
    accuracy = pipe.score(task.target_test_x.numpy(), task.target_test_y.numpy())
    assert accuracy > 0.3  # random-init features, 10 classes: far above chance


def test_aligners_compose_with_plain_sklearn_pipelines():
    x, y, _, target = two_domains()
    pipe = make_pipeline(StandardScaler(), CORAL(), TorchKernelSVC(unlabelled=-1)).fit(x, y)
    assert pipe.predict(target).shape == (len(target),)
    assert set(pipe.classes_) == {0, 1}


@pytest.mark.parametrize("kind", ["requires_grad", "bfloat16"])
def test_deep_features_take_grad_and_bfloat16_tensors(kind):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    rows = torch.randn(10, 4)
    given = rows.clone().requires_grad_(True) if kind == "requires_grad" else rows.bfloat16()
    expected = DeepFeatures(net, device="cpu", progress=False).fit_transform(
        given.detach().float().numpy()
    )
    got = DeepFeatures(net, device="cpu", progress=False).fit_transform(given)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


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
